"""SMART Backend Services with fhirclient: an RS384 client assertion, a system
token, and reads through fhirclient's models.

fhirclient 4.4.0 sends the client_credentials request itself (FHIROAuth2Auth.authorize
posts the `jwt_token` setting as `client_assertion`), but it does not sign that
assertion: it takes a ready JWT. So this script signs one as RFC 7523 and SMART
describe, with PyJWT.

Usage:
  backend_services.py keygen --out DIR
      writes DIR/private-key.pem and DIR/jwks.json (the public key, to register)
  backend_services.py read --base URL --client-id ID --private-key PEM --patient ID
      prints what the app read as one JSON object
The server's CA must be trusted, e.g. through REQUESTS_CA_BUNDLE.
"""

import argparse
import base64
import hashlib
import json
import os
import time
import uuid

import jwt
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fhirclient import client as smart
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRPermissionDeniedException

# Every request gets a limit, so a stalled server fails the test instead of hanging it.
TIMEOUT = 20


def b64url_uint(value):
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def public_jwk(private_key):
    """The public JWK, its kid the RFC 7638 thumbprint so it never needs storing."""
    numbers = private_key.public_key().public_numbers()
    required = {"e": b64url_uint(numbers.e), "kty": "RSA", "n": b64url_uint(numbers.n)}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    kid = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return {**required, "alg": "RS384", "use": "sig", "kid": kid}


def keygen(args):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    os.makedirs(args.out, exist_ok=True)
    pem_path = os.path.join(args.out, "private-key.pem")
    # Created private from the start, not narrowed after writing.
    fd = os.open(pem_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as pem:
        pem.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    jwk = public_jwk(key)
    jwks_path = os.path.join(args.out, "jwks.json")
    with open(jwks_path, "w") as jwks:
        json.dump({"keys": [jwk]}, jwks)
    print(json.dumps({"private_key": pem_path, "jwks": jwks_path, "kid": jwk["kid"]}))


def client_assertion(private_key, client_id, token_url):
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "exp": now + 300,
        "iat": now,
        "jti": str(uuid.uuid4()),
    }
    headers = {"kid": public_jwk(private_key)["kid"], "typ": "JWT"}
    return jwt.encode(claims, private_key, algorithm="RS384", headers=headers)


def read(args):
    discovery = requests.get(
        f"{args.base}/.well-known/smart-configuration", timeout=TIMEOUT
    )
    discovery.raise_for_status()
    discovery = discovery.json()
    for wanted, listed in [
        ("client-confidential-asymmetric", "capabilities"),
        ("private_key_jwt", "token_endpoint_auth_methods_supported"),
        ("RS384", "token_endpoint_auth_signing_alg_values_supported"),
        ("client_credentials", "grant_types_supported"),
    ]:
        if wanted not in discovery.get(listed, []):
            raise RuntimeError(f"{listed} does not offer {wanted}: {discovery}")
    token_url = discovery["token_endpoint"]

    with open(args.private_key, "rb") as pem:
        private_key = serialization.load_pem_private_key(pem.read(), password=None)

    app = smart.FHIRClient(
        settings={
            "app_id": args.client_id,
            "api_base": args.base,
            "scope": "system/*.rs",
            "jwt_token": client_assertion(private_key, args.client_id, token_url),
        }
    )
    # A system app has no patient to ask for; fhirclient would add launch/patient.
    app.wants_patient = False
    # Reads /metadata; the token endpoint there must be the discovered one.
    app.prepare()
    metadata_token_url = app.server.auth.state["token_uri"]
    if metadata_token_url != token_url:
        raise RuntimeError(f"metadata names {metadata_token_url}, discovery {token_url}")
    app.authorize()
    context = app.launch_context

    patient = Patient.read(args.patient, app.server)
    # A system token is not confined to one patient: every record is visible.
    observations = sorted(
        [o.id, o.subject.reference]
        for o in Observation.where(struct={}).perform_resources_iter(app.server)
        if o.resource_type == "Observation"
    )
    patients = sorted(
        p.id
        for p in Patient.where(struct={}).perform_resources_iter(app.server)
        if p.resource_type == "Patient"
    )

    # Registered for writes too, but this token asked only for reads.
    patient.gender = "other"
    try:
        patient.update(app.server)
        write = "accepted"
    except FHIRPermissionDeniedException as refused:
        write = f"refused with {refused.response.status_code}"

    print(
        json.dumps(
            {
                "token_type": context.get("token_type"),
                "granted_scope": context.get("scope"),
                "refresh_token": app.server.auth.refresh_token is not None,
                "patient_name": app.human_name(patient.name[0]),
                "observations": observations,
                "patients": patients,
                "write": write,
            }
        )
    )


def main():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    keygen_args = commands.add_parser("keygen")
    keygen_args.add_argument("--out", required=True)
    keygen_args.set_defaults(run=keygen)
    read_args = commands.add_parser("read")
    read_args.add_argument("--base", required=True)
    read_args.add_argument("--client-id", required=True)
    read_args.add_argument("--private-key", required=True)
    read_args.add_argument("--patient", required=True)
    read_args.set_defaults(run=read)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
