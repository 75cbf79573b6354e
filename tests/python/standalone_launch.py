"""A SMART standalone launch with fhirclient, signing in as a user would.

fhirclient builds the authorization URL (with PKCE) and exchanges the code; a
requests session plays the browser on Haven's sign-in and consent pages. What
the user saw and what the app read is printed as one JSON object.

Usage: standalone_launch.py --base URL --client-id ID --redirect-uri URI
           --username NAME --scope "..." [--other-patient ID]
The password is read from standard input. The server's CA must be trusted,
e.g. through REQUESTS_CA_BUNDLE.
"""

import argparse
import json
import sys
from html.parser import HTMLParser
from urllib.parse import parse_qs, urljoin, urlsplit

import requests
from fhirclient import client as smart
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient
from fhirclient.server import FHIRNotFoundException, FHIRPermissionDeniedException

# Every request gets a limit, so a stalled server fails the test instead of hanging it.
TIMEOUT = 20


class Page(HTMLParser):
    """The forms of a page, its first heading and the text of elements with an id."""

    def __init__(self, html):
        super().__init__(convert_charrefs=True)
        self.forms = []
        self.heading = None
        self.text = {}
        self.labels = {}
        # Open elements whose text is wanted: [tag, key, pieces].
        self._open = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self.forms.append(
                {
                    "action": attrs.get("action") or "",
                    "method": (attrs.get("method") or "get").lower(),
                    "inputs": [],
                    "buttons": [],
                }
            )
        elif tag == "input" and self.forms:
            self.forms[-1]["inputs"].append(attrs)
        elif tag == "button" and self.forms:
            self.forms[-1]["buttons"].append(attrs)
        if tag == "h1" and self.heading is None:
            self._open.append([tag, ("heading", None), []])
        elif tag == "label" and attrs.get("for"):
            self._open.append([tag, ("label", attrs["for"]), []])
        elif attrs.get("id") and tag != "input":
            self._open.append([tag, ("id", attrs["id"]), []])

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            _, (kind, key), pieces = self._open.pop()
            text = " ".join("".join(pieces).split())
            if kind == "heading":
                self.heading = text
            elif kind == "label":
                self.labels[key] = text
            else:
                self.text[key] = text

    def handle_data(self, data):
        for _, _, pieces in self._open:
            pieces.append(data)

    def form_with(self, predicate):
        """The first form with an input that satisfies `predicate`, if any."""
        for form in self.forms:
            if any(predicate(i) for i in form["inputs"]):
                return form
        return None


def submit(session, page_url, form, filled=None, button_id=None):
    """Sends a form as a browser would: the values it carries, what the user typed,
    checked boxes only, and the button that was pressed."""
    filled = filled or {}
    pairs = []
    for field in form["inputs"]:
        name = field.get("name")
        kind = (field.get("type") or "text").lower()
        if not name or kind in ("submit", "button", "reset", "image"):
            continue
        if kind in ("checkbox", "radio") and "checked" not in field:
            continue
        pairs.append((name, filled.get(name, field.get("value") or "")))
    if button_id is not None:
        button = next(b for b in form["buttons"] if b.get("id") == button_id)
        if button.get("name"):
            pairs.append((button["name"], button.get("value") or ""))
    url = urljoin(page_url, form["action"])
    if form["method"] != "post":
        raise RuntimeError(f"expected a POST form, got {form['method']}")
    return session.post(url, data=pairs, allow_redirects=False, timeout=TIMEOUT)


def follow(session, response, redirect_uri):
    """Follows the server's redirects; stops at the app's redirect URI, which
    nothing listens on, and returns it instead of a response."""
    while response.is_redirect:
        location = urljoin(response.url, response.headers["Location"])
        if location.startswith(redirect_uri):
            return None, location
        response = session.get(location, allow_redirects=False, timeout=TIMEOUT)
    return response, None


def split_search(resources):
    """Observations as (id, subject, value), and the server's notes on the search."""
    observations, warnings = [], []
    for resource in resources:
        if resource.resource_type == "OperationOutcome":
            warnings.extend(i.diagnostics for i in resource.issue)
        else:
            value = resource.valueQuantity.value if resource.valueQuantity else None
            observations.append([resource.id, resource.subject.reference, value])
    return sorted(observations), warnings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--redirect-uri", required=True)
    parser.add_argument("--username", required=True)
    parser.add_argument("--scope", required=True)
    parser.add_argument("--other-patient")
    args = parser.parse_args()
    password = sys.stdin.read().rstrip("\r\n")

    discovery = requests.get(
        f"{args.base}/.well-known/smart-configuration", timeout=TIMEOUT
    )
    discovery.raise_for_status()
    discovery = discovery.json()

    # fhirclient adds launch/patient itself, as a standalone patient app should.
    app = smart.FHIRClient(
        settings={
            "app_id": args.client_id,
            "api_base": args.base,
            "redirect_uri": args.redirect_uri,
            "scope": args.scope,
        }
    )
    # Reads /metadata for the OAuth endpoints and makes the PKCE verifier.
    authorize_url = app.authorize_url
    query = parse_qs(urlsplit(authorize_url).query)
    if not authorize_url.startswith(discovery["authorization_endpoint"] + "?"):
        raise RuntimeError(
            f"{authorize_url} is not the discovered {discovery['authorization_endpoint']}"
        )

    browser = requests.Session()
    response = browser.get(authorize_url, allow_redirects=False, timeout=TIMEOUT)
    pages = []
    consent = None
    while True:
        response, callback = follow(browser, response, args.redirect_uri)
        if callback is not None:
            break
        page = Page(response.text)
        if response.status_code != 200:
            raise RuntimeError(
                f"{response.url} answered {response.status_code}: "
                f"{page.text.get('error', response.text[:500])}"
            )
        pages.append({"path": urlsplit(response.url).path, "heading": page.heading})
        if len(pages) > 5:
            raise RuntimeError(f"the sign-in did not end: {pages}")
        sign_in = page.form_with(lambda f: f.get("type") == "password")
        approval = page.form_with(lambda f: f.get("name") == "scope")
        if sign_in is not None:
            response = submit(
                browser,
                response.url,
                sign_in,
                {"username": args.username, "password": password},
                button_id="sign-in",
            )
        elif approval is not None:
            consent = {
                "patient": page.text.get("patient"),
                "scopes": [
                    f["value"] for f in approval["inputs"] if f.get("name") == "scope"
                ],
                "descriptions": [
                    page.labels.get(f.get("id"))
                    for f in approval["inputs"]
                    if f.get("name") == "scope"
                ],
            }
            response = submit(browser, response.url, approval, button_id="approve")
        else:
            raise RuntimeError(f"unexpected page {response.url}: {page.heading}")

    cookies = sorted(c.name for c in browser.cookies)
    # fhirclient checks the state and exchanges the code with the PKCE verifier.
    app.handle_callback(callback)
    context = app.launch_context

    patient = Patient.read(app.patient_id, app.server)
    found = Observation.where(struct={"patient": app.patient_id}).perform_resources_iter(
        app.server
    )
    observations, warnings = split_search(found)

    other = None
    if args.other_patient:
        try:
            Patient.read(args.other_patient, app.server)
            other = "read"
        except (FHIRNotFoundException, FHIRPermissionDeniedException) as refused:
            other = f"refused with {refused.response.status_code}"

    # A refresh through fhirclient, as it does itself when a token stops working.
    first_token = app.server.auth.access_token
    refreshed = app.reauthorize() and app.server.auth.access_token != first_token
    again = Patient.read(app.patient_id, app.server)

    print(
        json.dumps(
            {
                "pkce": {
                    "method": query["code_challenge_method"][0],
                    "challenge_length": len(query["code_challenge"][0]),
                },
                "requested_scope": query["scope"][0],
                "pages": pages,
                "consent": consent,
                "cookies": cookies,
                "callback_has_code": "code" in parse_qs(urlsplit(callback).query),
                "granted_scope": context.get("scope"),
                "patient_id": app.patient_id,
                "has_refresh_token": app.server.auth.refresh_token is not None,
                "patient_name": app.human_name(patient.name[0]),
                "birth_date": patient.birthDate.isostring,
                "observations": observations,
                "search_warnings": warnings,
                "other_patient": other,
                "refreshed": refreshed,
                "name_after_refresh": app.human_name(again.name[0]),
            }
        )
    )


if __name__ == "__main__":
    main()
