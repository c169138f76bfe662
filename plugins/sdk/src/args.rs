//! Binds Celery's `args` (a JSON array) and `kwargs` (a JSON object) to a task function's
//! parameters the way Python binds a call: by position first, then by name; a parameter whose
//! type accepts `null` (an `Option`) may be left out. Every mismatch is a `TypeError` failure
//! with Python's wording, so a producer sees the same message it would from a Python worker.

use crate::Failure;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// The arguments of one call, consumed parameter by parameter.
#[derive(Debug)]
pub struct Args {
    task: String,
    positional: Vec<Value>,
    keyword: Map<String, Value>,
    next: usize,
}

impl Args {
    /// Parses the JSON texts the host passes.
    pub fn parse(task: &str, args: &str, kwargs: &str) -> Result<Self, Failure> {
        let positional = match serde_json::from_str(args) {
            Ok(Value::Array(values)) => values,
            Ok(Value::Null) => Vec::new(),
            Ok(other) => {
                return Err(type_error(
                    task,
                    format!("args must be a list, got {other}"),
                ));
            }
            Err(e) => return Err(type_error(task, format!("args are not valid JSON: {e}"))),
        };
        let keyword = match serde_json::from_str(kwargs) {
            Ok(Value::Object(map)) => map,
            Ok(Value::Null) => Map::new(),
            Ok(other) => {
                return Err(type_error(
                    task,
                    format!("kwargs must be a dict, got {other}"),
                ));
            }
            Err(e) => return Err(type_error(task, format!("kwargs are not valid JSON: {e}"))),
        };
        Ok(Self {
            task: task.to_owned(),
            positional,
            keyword,
            next: 0,
        })
    }

    /// The next parameter, `name`: from its position if given there, else from the keywords.
    pub fn next<T: DeserializeOwned>(&mut self, name: &str) -> Result<T, Failure> {
        let index = self.next;
        self.next += 1;
        let value = if let Some(slot) = self.positional.get_mut(index) {
            if self.keyword.contains_key(name) {
                return Err(type_error(
                    &self.task,
                    format!("got multiple values for argument '{name}'"),
                ));
            }
            slot.take()
        } else if let Some(value) = self.keyword.remove(name) {
            value
        } else {
            return serde_json::from_value(Value::Null).map_err(|_| {
                type_error(&self.task, format!("missing required argument '{name}'"))
            });
        };
        serde_json::from_value(value)
            .map_err(|e| type_error(&self.task, format!("argument '{name}': {e}")))
    }

    /// Checks nothing was left over once every parameter is bound.
    pub fn finish(&mut self) -> Result<(), Failure> {
        if self.positional.len() > self.next {
            return Err(type_error(
                &self.task,
                format!(
                    "takes {} positional argument(s) but {} were given",
                    self.next,
                    self.positional.len()
                ),
            ));
        }
        if let Some(name) = self.keyword.keys().next() {
            return Err(type_error(
                &self.task,
                format!("got an unexpected keyword argument '{name}'"),
            ));
        }
        Ok(())
    }
}

fn type_error(task: &str, message: String) -> Failure {
    Failure::error("TypeError", format!("{task}() {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(f: Failure) -> String {
        format!("{f:?}")
    }

    #[test]
    fn binds_positional_then_keyword() {
        let mut a = Args::parse("t", "[1]", r#"{"y": 2}"#).expect("parse");
        assert_eq!(a.next::<i64>("x").expect("x"), 1);
        assert_eq!(a.next::<i64>("y").expect("y"), 2);
        a.finish().expect("finish");
    }

    #[test]
    fn option_may_be_left_out_but_required_may_not() {
        let mut a = Args::parse("t", "[]", "{}").expect("parse");
        assert_eq!(a.next::<Option<u32>>("n").expect("n"), None);
        assert!(
            message(a.next::<u32>("m").expect_err("m")).contains("missing required argument 'm'")
        );
    }

    #[test]
    fn wrong_type_extra_and_unknown_are_type_errors() {
        let mut a = Args::parse("t", r#"["x", 2]"#, r#"{"z": 1}"#).expect("parse");
        assert!(message(a.next::<i64>("x").expect_err("x")).contains("argument 'x'"));
        let mut a = Args::parse("t", "[1, 2]", "{}").expect("parse");
        a.next::<i64>("x").expect("x");
        assert!(message(a.finish().expect_err("extra")).contains("takes 1 positional"));
        let mut a = Args::parse("t", "[]", r#"{"z": 1}"#).expect("parse");
        assert!(
            message(a.finish().expect_err("unknown")).contains("unexpected keyword argument 'z'")
        );
        assert!(Args::parse("t", "{", "{}").is_err());
        assert!(Args::parse("t", "3", "{}").is_err());
    }
}
