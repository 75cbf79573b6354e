//! Content negotiation: Haven speaks FHIR JSON only.
//!
//! R4 http.html#mime-type: `_format` overrides `Accept`; `json`,
//! `application/json` and `application/fhir+json` are accepted, anything else
//! (XML, Turtle, HTML-only) gets a 406. Request bodies of writes must be FHIR
//! JSON (415 otherwise), except patches (`application/json-patch+json`) and
//! searches by POST (`application/x-www-form-urlencoded`). A body without a
//! `Content-Type` is read as FHIR JSON, as many simple clients omit it.

use http::header::{ACCEPT, CONTENT_TYPE};
use http::HeaderMap;

use crate::error::ApiError;
use crate::interaction::RequestBody;
use crate::search_params::query_pairs;
use crate::strict_json;

/// Refuses a request whose client cannot read FHIR JSON.
pub fn check_acceptable(headers: &HeaderMap, query: Option<&str>) -> Result<(), ApiError> {
    if let Some(format) = query
        .map(query_pairs)
        .unwrap_or_default()
        .into_iter()
        .find(|(k, _)| k == "_format")
        .map(|(_, v)| v)
    {
        return if is_json_format(&format) {
            Ok(())
        } else {
            Err(ApiError::NotAcceptable(format!(
                "_format '{format}' is not supported; this server speaks application/fhir+json"
            )))
        };
    }
    let accept: Vec<&str> = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if accept.is_empty() {
        return Ok(());
    }
    let acceptable = accept
        .iter()
        .flat_map(|v| v.split(','))
        .map(|range| {
            range
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .any(|range| {
            range.is_empty()
                || matches!(
                    range.as_str(),
                    "*/*" | "application/*" | "application/json" | "application/fhir+json"
                )
        });
    if acceptable {
        Ok(())
    } else {
        Err(ApiError::NotAcceptable(
            "this server answers only in application/fhir+json".into(),
        ))
    }
}

fn is_json_format(format: &str) -> bool {
    let media = format.split(';').next().unwrap_or("").trim();
    matches!(
        media.to_ascii_lowercase().as_str(),
        "json" | "application/json" | "application/fhir+json"
    )
}

/// Decodes a request body by its `Content-Type`, under the JSON limits.
pub fn decode_body(
    headers: &HeaderMap,
    bytes: &[u8],
    max_depth: usize,
) -> Result<RequestBody, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(RequestBody::None);
    }
    let media = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let json = |bytes: &[u8]| {
        strict_json::parse(bytes, max_depth).map_err(|e| {
            ApiError::invalid(haven_model::outcome::IssueCode::Structure, e.to_string())
        })
    };
    match media.as_deref() {
        None | Some("application/fhir+json" | "application/json") => {
            Ok(RequestBody::Resource(json(bytes)?))
        }
        Some("application/json-patch+json") => Ok(RequestBody::JsonPatch(json(bytes)?)),
        Some("application/x-www-form-urlencoded") => {
            let text = std::str::from_utf8(bytes).map_err(|_| {
                ApiError::invalid(
                    haven_model::outcome::IssueCode::Invalid,
                    "the form body is not UTF-8",
                )
            })?;
            Ok(RequestBody::Form(query_pairs(text)))
        }
        Some(other) => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type '{other}' is not supported; send application/fhir+json"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn accept(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn json_and_wildcards_are_acceptable_and_xml_is_not() {
        assert!(check_acceptable(&accept("application/fhir+json"), None).is_ok());
        assert!(check_acceptable(&accept("text/html, */*;q=0.8"), None).is_ok());
        assert!(check_acceptable(&accept("application/fhir+xml"), None).is_err());
        assert!(check_acceptable(&HeaderMap::new(), Some("_format=xml")).is_err());
        assert!(check_acceptable(&accept("application/xml"), Some("_format=json")).is_ok());
    }

    #[test]
    fn bodies_are_decoded_by_content_type() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/xml"));
        assert_eq!(
            decode_body(&h, b"<Patient/>", 10).unwrap_err().status(),
            http::StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json; charset=utf-8"),
        );
        assert!(matches!(
            decode_body(&h, b"{}", 10),
            Ok(RequestBody::Resource(_))
        ));
    }
}
