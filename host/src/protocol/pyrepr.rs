//! Python's `repr` of JSON values: what Celery puts in `argsrepr`, in events and in the
//! replies monitors print (`(2, 3)`, `{'a': None}`, `ValueError('boom')`).

use serde_json::Value;

/// A JSON value as Python's `repr` prints the object it decodes to: what Celery puts in
/// events and what monitors show (`(2, 3)`, `{'a': None}`, `'text'`).
pub fn python_repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(&mut out, value);
    out
}

/// Positional arguments as Celery's `argsrepr`: a tuple.
pub fn args_repr(args: &Value) -> String {
    match args {
        Value::Array(items) if items.len() == 1 => format!("({},)", python_repr(&items[0])),
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(python_repr).collect();
            format!("({})", inner.join(", "))
        }
        other => python_repr(other),
    }
}

/// An exception as Python's `repr` prints it: `ValueError('boom')`.
pub fn exception_repr(kind: &str, message: &str) -> String {
    let mut out = format!("{kind}(");
    write_str_repr(&mut out, message);
    out.push(')');
    out
}

fn write_repr(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_str_repr(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str_repr(out, key);
                out.push_str(": ");
                write_repr(out, item);
            }
            out.push('}');
        }
    }
}

/// A string as Python quotes it: single quotes unless the text holds one and no double quote.
fn write_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reprs_match_python() {
        assert_eq!(args_repr(&json!([2, 3])), "(2, 3)");
        assert_eq!(args_repr(&json!(["x"])), "('x',)");
        assert_eq!(args_repr(&json!([])), "()");
        assert_eq!(
            python_repr(&json!({"a": null, "b": [true, 1.5], "c": "it's"})),
            "{'a': None, 'b': [True, 1.5], 'c': \"it's\"}"
        );
        assert_eq!(python_repr(&json!("a\nb'\"")), "'a\\nb\\'\"'");
        assert_eq!(exception_repr("ValueError", "boom"), "ValueError('boom')");
    }
}
