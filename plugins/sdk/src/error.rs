//! How errors become task failures: `?` on any standard error, a `String` or `&str` (and, with
//! the `anyhow` feature, an `anyhow::Error`) fails the task with the kind Python names that
//! error by ([`Kind`]: an I/O error is `OSError` or its subclass, a parse error `ValueError`),
//! else `Exception`; the message is the error's chain, joined with ": ".

use crate::Failure;
use std::error::Error;

/// Python's builtin exception names, for `Failure::error(Kind::ValueError, ...)`: `.get()`
/// raises them as Python's own. A free string is still accepted wherever a kind is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Kind {
    Exception,
    ArithmeticError,
    AssertionError,
    AttributeError,
    BlockingIOError,
    BrokenPipeError,
    ConnectionAbortedError,
    ConnectionError,
    ConnectionRefusedError,
    ConnectionResetError,
    EOFError,
    FileExistsError,
    FileNotFoundError,
    IndexError,
    InterruptedError,
    KeyError,
    LookupError,
    NotImplementedError,
    OSError,
    OverflowError,
    PermissionError,
    RuntimeError,
    TimeoutError,
    TypeError,
    UnicodeDecodeError,
    ValueError,
    ZeroDivisionError,
    /// Not a builtin: something the operator did not grant (an HTTP origin, say).
    CapabilityDenied,
}

impl Kind {
    /// The name Python raises.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exception => "Exception",
            Self::ArithmeticError => "ArithmeticError",
            Self::AssertionError => "AssertionError",
            Self::AttributeError => "AttributeError",
            Self::BlockingIOError => "BlockingIOError",
            Self::BrokenPipeError => "BrokenPipeError",
            Self::ConnectionAbortedError => "ConnectionAbortedError",
            Self::ConnectionError => "ConnectionError",
            Self::ConnectionRefusedError => "ConnectionRefusedError",
            Self::ConnectionResetError => "ConnectionResetError",
            Self::EOFError => "EOFError",
            Self::FileExistsError => "FileExistsError",
            Self::FileNotFoundError => "FileNotFoundError",
            Self::IndexError => "IndexError",
            Self::InterruptedError => "InterruptedError",
            Self::KeyError => "KeyError",
            Self::LookupError => "LookupError",
            Self::NotImplementedError => "NotImplementedError",
            Self::OSError => "OSError",
            Self::OverflowError => "OverflowError",
            Self::PermissionError => "PermissionError",
            Self::RuntimeError => "RuntimeError",
            Self::TimeoutError => "TimeoutError",
            Self::TypeError => "TypeError",
            Self::UnicodeDecodeError => "UnicodeDecodeError",
            Self::ValueError => "ValueError",
            Self::ZeroDivisionError => "ZeroDivisionError",
            Self::CapabilityDenied => "CapabilityDenied",
        }
    }
}

impl From<Kind> for String {
    fn from(kind: Kind) -> Self {
        kind.as_str().to_owned()
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<E> From<E> for Failure
where
    E: Into<Box<dyn Error + Send + Sync>> + 'static,
{
    fn from(error: E) -> Self {
        #[cfg(feature = "anyhow")]
        if let Some(error) = (&error as &dyn std::any::Any).downcast_ref::<anyhow::Error>() {
            return failure_of(error.chain());
        }
        let error: Box<dyn Error + Send + Sync> = error.into();
        failure_of(Chain(Some(&*error)))
    }
}

/// An error and its sources, outermost first.
#[derive(Clone, Copy)]
struct Chain<'a>(Option<&'a (dyn Error + 'static)>);

impl<'a> Iterator for Chain<'a> {
    type Item = &'a (dyn Error + 'static);
    fn next(&mut self) -> Option<Self::Item> {
        let current = self.0?;
        self.0 = current.source();
        Some(current)
    }
}

fn failure_of<'a>(chain: impl Iterator<Item = &'a (dyn Error + 'static)> + Clone) -> Failure {
    let kind = chain.clone().find_map(kind_of).unwrap_or(Kind::Exception);
    let mut message = String::new();
    for error in chain {
        let text = error.to_string();
        // anyhow and thiserror often repeat a source's text in the outer message.
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    Failure::error(kind, message)
}

/// Python's kind for one error, where it has one.
pub(crate) fn kind_of(error: &(dyn Error + 'static)) -> Option<Kind> {
    if let Some(io) = error.downcast_ref::<std::io::Error>() {
        return Some(io_kind(io.kind()));
    }
    if let Some(known) = error.downcast_ref::<crate::http::HttpError>() {
        return Some(known.python_kind());
    }
    let value_error = error.is::<serde_json::Error>()
        || error.is::<std::num::ParseIntError>()
        || error.is::<std::num::ParseFloatError>()
        || error.is::<std::str::ParseBoolError>()
        || error.is::<std::char::ParseCharError>();
    if value_error {
        return Some(Kind::ValueError);
    }
    if error.is::<std::str::Utf8Error>() || error.is::<std::string::FromUtf8Error>() {
        return Some(Kind::UnicodeDecodeError);
    }
    if error.is::<std::num::TryFromIntError>() {
        return Some(Kind::OverflowError);
    }
    None
}

/// Python's OSError subclass for an I/O error kind, as CPython picks it from errno.
fn io_kind(kind: std::io::ErrorKind) -> Kind {
    use std::io::ErrorKind as K;
    match kind {
        K::NotFound => Kind::FileNotFoundError,
        K::PermissionDenied => Kind::PermissionError,
        K::AlreadyExists => Kind::FileExistsError,
        K::ConnectionRefused => Kind::ConnectionRefusedError,
        K::ConnectionReset => Kind::ConnectionResetError,
        K::ConnectionAborted => Kind::ConnectionAbortedError,
        K::BrokenPipe => Kind::BrokenPipeError,
        K::TimedOut => Kind::TimeoutError,
        K::WouldBlock => Kind::BlockingIOError,
        K::Interrupted => Kind::InterruptedError,
        K::UnexpectedEof => Kind::EOFError,
        _ => Kind::OSError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Result;

    fn kind_and_message(failure: Failure) -> (String, String) {
        match failure.0 {
            crate::types::Failure::Error(e) => (e.kind, e.message),
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn an_io_error_is_the_oserror_python_would_raise() {
        let read = || -> Result<String> { Ok(std::fs::read_to_string("/no/such/file/anywhere")?) };
        let (kind, message) = kind_and_message(read().expect_err("fails"));
        assert_eq!(kind, "FileNotFoundError");
        assert!(message.contains("No such file"), "{message}");
    }

    #[test]
    fn a_parse_error_is_a_value_error() {
        let parse = || -> Result<i64> { Ok("forty-two".parse::<i64>()?) };
        assert_eq!(
            kind_and_message(parse().expect_err("fails")).0,
            "ValueError"
        );
    }

    #[test]
    fn a_string_error_is_an_exception_with_its_text() {
        let fail = || -> Result<()> { Err("no luck")? };
        assert_eq!(
            kind_and_message(fail().expect_err("fails")),
            ("Exception".to_owned(), "no luck".to_owned())
        );
    }

    #[test]
    fn the_message_carries_the_whole_chain() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("loading the model")
            }
        }
        impl Error for Outer {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&self.0)
            }
        }
        let inner = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let (kind, message) = kind_and_message(Outer(inner).into());
        assert_eq!(kind, "PermissionError");
        assert_eq!(message, "loading the model: denied");
    }

    #[test]
    fn a_typed_kind_reads_as_python_names_it() {
        let (kind, _) = kind_and_message(Failure::error(Kind::KeyError, "x"));
        assert_eq!(kind, "KeyError");
    }

    #[cfg(feature = "anyhow")]
    #[test]
    fn an_anyhow_error_keeps_the_kind_of_what_it_wraps() {
        let read = || -> Result<String> {
            let text =
                std::fs::read_to_string("/no/such/file/anywhere").map_err(anyhow::Error::from)?;
            Ok(text)
        };
        assert_eq!(
            kind_and_message(read().expect_err("fails")).0,
            "FileNotFoundError"
        );
    }
}
