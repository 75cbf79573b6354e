//! A small JSON printer: indented down to a given depth, single-line below it.
//!
//! Object keys are written sorted, whatever order the value holds them in, so the
//! output depends only on the content.

use serde_json::Value;

/// Renders `value`, indenting containers shallower than `pretty_depth`.
pub fn render(value: &Value, pretty_depth: usize) -> String {
    let mut out = String::new();
    emit(value, 0, pretty_depth, &mut out);
    out
}

fn emit(value: &Value, depth: usize, pretty_depth: usize, out: &mut String) {
    let pretty = depth < pretty_depth;
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                separate(i, depth, pretty, out);
                emit(item, depth + 1, pretty_depth, out);
            }
            close(depth, pretty, out);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                separate(i, depth, pretty, out);
                out.push_str(&Value::String(key.clone()).to_string());
                out.push_str(if pretty { ": " } else { ":" });
                emit(item, depth + 1, pretty_depth, out);
            }
            close(depth, pretty, out);
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn separate(index: usize, depth: usize, pretty: bool, out: &mut String) {
    if index > 0 {
        out.push(',');
    }
    if pretty {
        out.push('\n');
        out.push_str(&"  ".repeat(depth + 1));
    }
}

fn close(depth: usize, pretty: bool, out: &mut String) {
    if pretty {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    }
}
