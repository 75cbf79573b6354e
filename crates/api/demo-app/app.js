// Haven's demo SMART app (SMART App Launch 2.x, public client with PKCE).
//
// index.html is the standalone launch and the redirect URI; launch.html is the
// launch URL an EHR opens with `iss` and `launch`. Both end in the same place:
// a code exchanged for a token, then three FHIR reads with that token. The app
// talks only to the server that serves it (config.json says which), so an `iss`
// naming another server is refused rather than followed.
'use strict';

const $ = (id) => document.getElementById(id);

// ----- SMART launch --------------------------------------------------------------

/** The app's registration and FHIR base, served beside it by Haven. */
async function appConfig() {
  const response = await fetch('config.json');
  if (!response.ok) throw new Error('the app is not registered on this server');
  return response.json();
}

/** The server's SMART configuration (authorize and token endpoints). */
async function smartConfig(fhirBase) {
  const response = await fetch(fhirBase + '/.well-known/smart-configuration');
  if (!response.ok) throw new Error('the server has no SMART configuration');
  return response.json();
}

/** This page's URL without query: what the app registered as its redirect URI. */
function redirectUri() {
  return new URL('./', location.href).href;
}

function base64url(bytes) {
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function randomString(length) {
  return base64url(crypto.getRandomValues(new Uint8Array(length)));
}

/** PKCE S256: the challenge is the SHA-256 of the verifier (RFC 7636 section 4.2). */
async function codeChallenge(verifier) {
  const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(verifier));
  return base64url(new Uint8Array(digest));
}

/** Sends the browser to the authorization endpoint; `launch` only for EHR launches. */
async function authorize(scope, launch) {
  const config = await appConfig();
  const smart = await smartConfig(config.fhir_base);
  const state = randomString(16);
  const verifier = randomString(32);
  // Kept for the way back; sessionStorage stays with this tab.
  sessionStorage.setItem('pending', JSON.stringify({ state, verifier }));
  const params = new URLSearchParams({
    response_type: 'code',
    client_id: config.client_id,
    redirect_uri: redirectUri(),
    scope,
    state,
    aud: config.fhir_base,
    code_challenge: await codeChallenge(verifier),
    code_challenge_method: 'S256',
  });
  if (launch) params.set('launch', launch);
  location.assign(smart.authorization_endpoint + '?' + params);
}

/** Back from the authorization server: checks state, trades the code for a token. */
async function completeAuthorization(params) {
  const pending = JSON.parse(sessionStorage.getItem('pending') || 'null');
  sessionStorage.removeItem('pending');
  // The code and state must not stay in the address bar or the history.
  history.replaceState(null, '', redirectUri());
  if (params.has('error')) {
    throw new Error('the authorization server said ' + params.get('error') +
      (params.get('error_description') ? ': ' + params.get('error_description') : ''));
  }
  if (!pending || pending.state !== params.get('state')) {
    throw new Error('this answer does not belong to a sign-in started here (state mismatch)');
  }
  const config = await appConfig();
  const smart = await smartConfig(config.fhir_base);
  const response = await fetch(smart.token_endpoint, {
    method: 'POST',
    headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({
      grant_type: 'authorization_code',
      code: params.get('code'),
      redirect_uri: redirectUri(),
      client_id: config.client_id,
      code_verifier: pending.verifier,
    }),
  });
  const token = await response.json();
  if (!response.ok) throw new Error('the token request failed: ' + (token.error_description || token.error));
  const session = {
    accessToken: token.access_token, patient: token.patient, fhirBase: config.fhir_base, clientId: config.client_id,
  };
  sessionStorage.setItem('session', JSON.stringify(session));
  return session;
}

// ----- reading the record ----------------------------------------------------------

/** GET on the FHIR API with the token; the body, or an Error carrying the status. */
async function fhir(session, path) {
  const response = await fetch(session.fhirBase + '/' + path, {
    headers: { Authorization: 'Bearer ' + session.accessToken, Accept: 'application/fhir+json' },
  });
  const body = await response.json();
  if (!response.ok) {
    const issue = body.issue && body.issue[0];
    const error = new Error((issue && issue.diagnostics) || 'HTTP ' + response.status);
    error.status = response.status;
    throw error;
  }
  return body;
}

/** The resources of a search Bundle, and whether the server withheld any. */
function matches(bundle) {
  const entries = bundle.entry || [];
  const resources = entries.filter((e) => e.search && e.search.mode === 'match').map((e) => e.resource);
  const withheld = entries.some((e) => e.resource.resourceType === 'OperationOutcome' &&
    (e.resource.issue || []).some((i) => i.code === 'suppressed'));
  return { resources, withheld };
}

function text(concept) {
  if (!concept) return '';
  return concept.text || (concept.coding || []).map((c) => c.display || c.code).join(', ');
}

function humanName(patient) {
  const name = (patient.name || [])[0] || {};
  return [...(name.given || []), name.family].filter(Boolean).join(' ');
}

function value(observation) {
  const q = observation.valueQuantity;
  if (q) return q.value + ' ' + (q.unit || '');
  if (observation.component) {
    return observation.component.map((c) => c.valueQuantity && c.valueQuantity.value).join('/') + ' ' +
      ((observation.component[0].valueQuantity || {}).unit || '');
  }
  return text(observation.valueCodeableConcept);
}

/** The sensitivity categories Haven labeled a resource with (meta.security). */
function sensitivity(resource) {
  return ((resource.meta || {}).security || [])
    .filter((s) => s.system === 'http://terminology.hl7.org/CodeSystem/v3-ActCode')
    .map((s) => s.code);
}

function row(table, cells) {
  const tr = document.createElement('tr');
  for (const cell of cells) {
    const td = document.createElement('td');
    td.textContent = cell;
    tr.appendChild(td);
  }
  $(table).querySelector('tbody').appendChild(tr);
}

async function showRecord(session) {
  $('start').hidden = true;
  $('status').textContent = 'Reading the record…';
  const patient = await fhir(session, 'Patient/' + encodeURIComponent(session.patient));
  $('patient-name').textContent = humanName(patient);
  $('patient-details').textContent = [patient.gender, patient.birthDate && 'born ' + patient.birthDate]
    .filter(Boolean).join(', ');

  const conditions = matches(await fhir(session, 'Condition?patient=' + session.patient + '&_count=100'));
  for (const condition of conditions.resources) {
    const li = document.createElement('li');
    li.textContent = text(condition.code);
    for (const code of sensitivity(condition)) {
      const badge = document.createElement('span');
      badge.className = 'label';
      badge.textContent = code;
      li.appendChild(badge);
    }
    $('conditions').appendChild(li);
  }
  if (conditions.withheld) {
    $('withheld').hidden = false;
    $('withheld').textContent = 'Some records are not shown: they are more sensitive than your access allows, ' +
      'or the patient\'s privacy choices keep them from you.';
  }

  const observations = matches(await fhir(session,
    'Observation?patient=' + session.patient + '&_sort=-date&_count=200')).resources;
  for (const observation of observations.slice(0, 12)) {
    row('observations', [(observation.effectiveDateTime || '').slice(0, 10), text(observation.code), value(observation)]);
  }
  plot(observations);

  try {
    const events = matches(await fhir(session, 'AuditEvent?patient=' + session.patient + '&_sort=-date&_count=15'));
    for (const event of events.resources) row('access-log', accessLogRow(event, session));
    $('access-log-note').textContent = 'The most recent accesses, from the server\'s audit trail.';
  } catch (error) {
    // Only the patient (and administrators) may read a patient's access log.
    $('access-log-note').textContent = error.status === 403
      ? 'The access log is shown to the patient only.' : 'The access log could not be read: ' + error.message;
  }
  $('status').textContent = '';
  $('record').hidden = false;
}

function codes(concept) {
  return ((concept || {}).coding || []).map((c) => c.code);
}

/**
 * When, who, with which app and what, from one AuditEvent. Haven records the
 * signed-in user (username and fhirUser) and the app (its client_id); a request
 * with no user is a system's, such as the loader that wrote the record.
 */
function accessLogRow(event, session) {
  const agents = event.agent || [];
  const user = agents.find((a) => codes(a.type).includes('humanuser'));
  const app = agents.find((a) => (a.role || []).some((r) => codes(r).includes('110150')));
  const appId = app && app.who && app.who.identifier && app.who.identifier.value;
  const who = user
    ? user.who.identifier.value + (user.who.reference === 'Patient/' + session.patient ? ' (you)' : '')
    : 'a system, no person signed in';
  const what = (event.subtype || []).map((s) => s.display || s.code).join(', ') || text(event.type);
  return [
    (event.recorded || '').replace('T', ' ').slice(0, 16),
    who,
    appId === session.clientId ? 'this app' : appId || '',
    what + (event.outcome && event.outcome !== '0' ? ' (refused)' : ''),
  ];
}

/** A line chart of the observation measured most often (body weight when there is one). */
function plot(observations) {
  const counts = {};
  for (const o of observations) if (o.valueQuantity) counts[text(o.code)] = (counts[text(o.code)] || 0) + 1;
  const names = Object.keys(counts).sort((a, b) => counts[b] - counts[a]);
  const name = names.includes('Body weight') ? 'Body weight' : names[0];
  if (!name) return;
  const points = observations.filter((o) => o.valueQuantity && text(o.code) === name)
    .map((o) => ({ t: Date.parse(o.effectiveDateTime), v: o.valueQuantity.value, unit: o.valueQuantity.unit }))
    .sort((a, b) => a.t - b.t);
  const [t0, t1] = [points[0].t, points[points.length - 1].t];
  const values = points.map((p) => p.v);
  const [v0, v1] = [Math.min(...values), Math.max(...values)];
  const x = (t) => 50 + (t1 === t0 ? 250 : (t - t0) / (t1 - t0) * 520);
  const y = (v) => 170 - (v1 === v0 ? 75 : (v - v0) / (v1 - v0) * 150);
  const svg = $('plot');
  const ns = 'http://www.w3.org/2000/svg';
  const add = (tag, attributes, content) => {
    const element = document.createElementNS(ns, tag);
    for (const [key, val] of Object.entries(attributes)) element.setAttribute(key, val);
    if (content !== undefined) element.textContent = content;
    svg.appendChild(element);
  };
  add('polyline', { points: points.map((p) => x(p.t) + ',' + y(p.v)).join(' ') });
  for (const p of points) add('circle', { cx: x(p.t), cy: y(p.v), r: 3 });
  add('text', { x: 4, y: y(v1) + 4 }, String(v1));
  add('text', { x: 4, y: y(v0) + 4 }, String(v0));
  add('text', { x: 50, y: 192 }, new Date(t0).toISOString().slice(0, 10));
  add('text', { x: 500, y: 192 }, new Date(t1).toISOString().slice(0, 10));
  $('plot-caption').textContent = name + ' (' + points[0].unit + '), ' + points.length + ' measurements';
}

// ----- the page --------------------------------------------------------------------

function fail(error) {
  $('status').textContent = error.message;
  $('status').className = 'error';
}

async function main() {
  const params = new URLSearchParams(location.search);
  if (location.pathname.endsWith('/launch.html')) {
    // EHR launch: the EHR names its FHIR server (iss) and the launch context.
    const config = await appConfig();
    if (params.get('iss') !== config.fhir_base) throw new Error('launched by an unknown server: ' + params.get('iss'));
    return authorize('launch openid fhirUser patient/*.rs', params.get('launch'));
  }
  $('standalone').addEventListener('click', () =>
    authorize('launch/patient openid fhirUser patient/*.rs').catch(fail));
  $('sign-out').addEventListener('click', () => {
    sessionStorage.removeItem('session');
    location.assign(redirectUri());
  });
  let session = JSON.parse(sessionStorage.getItem('session') || 'null');
  if (params.has('code') || params.has('error')) session = await completeAuthorization(params);
  if (session) await showRecord(session);
}

main().catch(fail);
