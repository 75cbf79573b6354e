//! The authorization server's HTML pages: sign-in, patient picker, consent,
//! the EHR launcher and errors. Plain server-rendered forms that work without
//! scripts; every value written into a page is escaped.

use std::fmt::Write;

/// Escapes text for HTML element content and quoted attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem;color:#1d2733}\
h1{font-size:1.4rem}form>label{display:block;margin:.6rem 0 .2rem}\
input[type=text],input[type=password],input[type=search]{width:100%;padding:.5rem;font-size:1rem;box-sizing:border-box}\
button{padding:.55rem 1.2rem;font-size:1rem;margin:.8rem .5rem 0 0;cursor:pointer}\
.error{background:#fde8e8;border:1px solid #e0a3a3;padding:.6rem;border-radius:4px}\
.muted{color:#5b6673;font-size:.9rem}ul.choices{list-style:none;padding:0}ul.choices li{margin:.4rem 0}\
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.35rem;border-bottom:1px solid #dde3ea}";

/// A whole page around `body` (already HTML).
pub(crate) fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Haven</title><style>{STYLE}</style></head>\
         <body><main>{body}</main></body></html>",
        escape(title)
    )
}

pub(crate) fn error_page(message: &str) -> String {
    page(
        "Cannot continue",
        &format!(
            "<h1>Cannot continue</h1><p class=\"error\" id=\"error\">{}</p>",
            escape(message)
        ),
    )
}

pub(crate) fn login_page(
    request: Option<&str>,
    app: Option<&str>,
    error: Option<&str>,
    csrf: &str,
) -> String {
    let mut body = String::from("<h1>Sign in to Haven</h1>");
    if let Some(app) = app {
        let _ = write!(
            body,
            "<p><strong>{}</strong> asks to connect to your health records.</p>",
            escape(app)
        );
    }
    if let Some(error) = error {
        let _ = write!(
            body,
            "<p class=\"error\" id=\"error\">{}</p>",
            escape(error)
        );
    }
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/auth/login\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        escape(csrf)
    );
    if let Some(request) = request {
        let _ = write!(
            body,
            "<input type=\"hidden\" name=\"request\" value=\"{}\">",
            escape(request)
        );
    }
    body.push_str(
        "<label for=\"username\">Username</label>\
         <input type=\"text\" id=\"username\" name=\"username\" autocomplete=\"username\" required autofocus>\
         <label for=\"password\">Password</label>\
         <input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" required>\
         <button type=\"submit\" id=\"sign-in\">Sign in</button></form>",
    );
    page("Sign in", &body)
}

/// One patient row for the picker and the launcher.
pub(crate) struct PatientChoice {
    pub id: String,
    pub name: String,
    pub birth_date: String,
}

fn patient_table(patients: &[PatientChoice], input: &str) -> String {
    if patients.is_empty() {
        return "<p class=\"muted\" id=\"no-patients\">No patients match.</p>".into();
    }
    let mut out =
        String::from("<table><thead><tr><th></th><th>Name</th><th>Born</th></tr></thead><tbody>");
    for (i, p) in patients.iter().enumerate() {
        let _ = write!(
            out,
            "<tr><td><input type=\"radio\" name=\"{input}\" id=\"patient-{i}\" value=\"{}\" required></td>\
             <td><label for=\"patient-{i}\">{}</label></td><td>{}</td></tr>",
            escape(&p.id),
            escape(&p.name),
            escape(&p.birth_date)
        );
    }
    out.push_str("</tbody></table>");
    out
}

pub(crate) fn patient_picker(
    request: &str,
    app: &str,
    query: &str,
    patients: &[PatientChoice],
) -> String {
    let body = format!(
        "<h1>Choose a patient</h1><p><strong>{app}</strong> will work with the record you choose.</p>\
         <form method=\"get\" action=\"/auth/patient\"><input type=\"hidden\" name=\"request\" value=\"{request}\">\
         <label for=\"q\">Find by name</label><input type=\"search\" id=\"q\" name=\"q\" value=\"{query}\">\
         <button type=\"submit\" id=\"find\">Find</button></form>\
         <form method=\"post\" action=\"/auth/patient\"><input type=\"hidden\" name=\"request\" value=\"{request}\">\
         {table}<button type=\"submit\" id=\"choose\">Continue</button></form>",
        app = escape(app),
        request = escape(request),
        query = escape(query),
        table = patient_table(patients, "patient"),
    );
    page("Choose a patient", &body)
}

/// One scope on the consent page: its text and its description.
pub(crate) struct ScopeChoice {
    pub scope: String,
    pub description: String,
}

pub(crate) fn consent_page(
    request: &str,
    app: &str,
    user: &str,
    patient: Option<&str>,
    scopes: &[ScopeChoice],
) -> String {
    let mut items = String::new();
    for (i, s) in scopes.iter().enumerate() {
        let _ = write!(
            items,
            "<li><input type=\"checkbox\" name=\"scope\" id=\"scope-{i}\" value=\"{}\" checked> \
             <label for=\"scope-{i}\">{}</label> <span class=\"muted\">({})</span></li>",
            escape(&s.scope),
            escape(&s.description),
            escape(&s.scope)
        );
    }
    let patient = patient
        .map(|p| {
            format!(
                "<p>Patient record: <strong id=\"patient\">{}</strong></p>",
                escape(p)
            )
        })
        .unwrap_or_default();
    let body = format!(
        "<h1>Allow {app} access?</h1><p>Signed in as <strong>{user}</strong>.</p>{patient}\
         <p>{app} asks to:</p>\
         <form method=\"post\" action=\"/auth/consent\"><input type=\"hidden\" name=\"request\" value=\"{request}\">\
         <ul class=\"choices\">{items}</ul>\
         <p class=\"muted\">Uncheck anything you do not want to allow.</p>\
         <button type=\"submit\" name=\"decision\" value=\"approve\" id=\"approve\">Allow</button>\
         <button type=\"submit\" name=\"decision\" value=\"deny\" id=\"deny\">Deny</button></form>",
        app = escape(app),
        user = escape(user),
        request = escape(request),
    );
    page("Allow access", &body)
}

/// A registered app the launcher can open.
pub(crate) struct AppChoice {
    pub client_id: String,
    pub name: String,
}

pub(crate) fn launcher_page(
    user: &str,
    query: &str,
    patients: &[PatientChoice],
    apps: &[AppChoice],
) -> String {
    let mut app_items = String::new();
    for (i, a) in apps.iter().enumerate() {
        let _ = write!(
            app_items,
            "<li><input type=\"radio\" name=\"client_id\" id=\"app-{i}\" value=\"{}\" required> \
             <label for=\"app-{i}\">{}</label></li>",
            escape(&a.client_id),
            escape(&a.name)
        );
    }
    if apps.is_empty() {
        app_items.push_str(
            "<li class=\"muted\" id=\"no-apps\">No registered app has a launch URL.</li>",
        );
    }
    let body = format!(
        "<h1>Launch an app</h1><p>Signed in as <strong>{user}</strong>.</p>\
         <form method=\"get\" action=\"/auth/launcher\">\
         <label for=\"q\">Find a patient by name</label><input type=\"search\" id=\"q\" name=\"q\" value=\"{query}\">\
         <button type=\"submit\" id=\"find\">Find</button></form>\
         <form method=\"post\" action=\"/auth/launcher\"><h2>Patient</h2>{table}\
         <h2>App</h2><ul class=\"choices\">{app_items}</ul>\
         <button type=\"submit\" id=\"launch\">Launch</button></form>",
        user = escape(user),
        query = escape(query),
        table = patient_table(patients, "patient"),
    );
    page("Launch an app", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_written_into_pages_is_escaped() {
        let html = error_page("<script>alert('x')</script> & \"more\"");
        assert!(
            html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;more&quot;")
        );
        assert!(!html.contains("<script>"));
    }

    #[test]
    fn the_consent_page_lists_every_scope_checked() {
        let html = consent_page(
            "r1",
            "Growth <Chart>",
            "amy",
            Some("Amy Shaw"),
            &[
                ScopeChoice {
                    scope: "patient/Observation.rs".into(),
                    description: "Read and search your Observation records".into(),
                },
                ScopeChoice {
                    scope: "openid".into(),
                    description: "Know who you are".into(),
                },
            ],
        );
        assert_eq!(html.matches("checked").count(), 2);
        assert!(html.contains("Growth &lt;Chart&gt;"));
        assert!(html.contains("value=\"patient/Observation.rs\""));
    }
}
