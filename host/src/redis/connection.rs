//! The connections every Redis call goes through, and what they do with a command Redis refuses
//! to the connection's ACL user.
//!
//! Redis's own refusal names neither the key nor, inside a Lua script, the command
//! (`NOPERM this user has no permissions to access one of the keys used as arguments`). A
//! [`Named`] connection rewrites it into one that does, from the command it sent: `Redis
//! refused LPUSH on "celery" to ACL user "producer"`, with the script's file for an `EVALSHA`,
//! so an operator knows what to grant, and reports it to [`refusals`]: a worker whose user lacks
//! a permission it needs stops with that message instead of retrying a command that cannot
//! pass. A connection made [`Named::quiet`] only names its refusals, for best-effort reads
//! (`CONFIG GET`) a least-privilege user may well be refused.

use super::scripts;
use ::redis::aio::ConnectionLike;
use ::redis::{Arg, Cmd, Pipeline, RedisFuture, ServerError, Value};
use std::sync::{Arc, OnceLock};
use tokio::sync::watch;

/// What a refused command's error says before the command (and how it is told apart).
const REFUSED: &str = "Redis refused ";

/// A connection whose refused commands are named (see the module's doc).
#[derive(Clone)]
pub struct Named<C> {
    inner: C,
    user: Arc<str>,
    reports: bool,
}

impl<C> Named<C> {
    /// `inner`, authenticated as `user` (none: the `default` user).
    pub fn new(inner: C, user: Option<&str>) -> Self {
        Self {
            inner,
            user: user.unwrap_or("default").into(),
            reports: true,
        }
    }

    /// This connection, not reporting its refusals to [`refusals`].
    #[must_use]
    pub fn quiet(mut self) -> Self {
        self.reports = false;
        self
    }

    fn refused(&self, e: ::redis::RedisError) -> ::redis::RedisError {
        if self.reports
            && let Some(message) = refusal(&e)
        {
            report(message);
        }
        e
    }
}

impl<C: ConnectionLike + Send> ConnectionLike for Named<C> {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            match self.inner.req_packed_command(cmd).await {
                Ok(Value::ServerError(e)) if is_refusal(&e) => {
                    Err(self.refused(named(&e, cmd, &self.user)))
                }
                Err(e) => Err(self.refused(renamed(e, &self.user, |_| Some(cmd)))),
                reply => reply,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let command = |index: usize| pipeline.cmd_iter().nth(index);
            match self
                .inner
                .req_packed_commands(pipeline, offset, count)
                .await
            {
                Ok(values) => {
                    let refused = values.iter().enumerate().find_map(|(i, v)| match v {
                        Value::ServerError(e) if is_refusal(e) => Some((i, e)),
                        _ => None,
                    });
                    match refused.and_then(|(i, e)| Some((command(i)?, e))) {
                        Some((cmd, e)) => Err(self.refused(named(e, cmd, &self.user))),
                        None => Ok(values),
                    }
                }
                Err(e) => Err(self.refused(renamed(e, &self.user, command))),
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// `e`, named after the command at its index in what was sent (`command`) when it is a refusal.
pub(super) fn renamed<'c>(
    e: ::redis::RedisError,
    user: &str,
    command: impl Fn(usize) -> Option<&'c Cmd>,
) -> ::redis::RedisError {
    let Some(errors) = e.clone().into_server_errors() else {
        return e;
    };
    errors
        .iter()
        .find(|(_, error)| is_refusal(error))
        .and_then(|(index, error)| Some(named(error, command(*index)?, user)))
        .unwrap_or(e)
}

/// Whether Redis refused a command to the connection's user: `NOPERM` for a command, a key or a
/// channel, and its wording inside a Lua script, where the reply is a plain `ERR`.
fn is_refusal(error: &ServerError) -> bool {
    error.code() == "NOPERM"
        || (error.code() == "ERR"
            && error
                .details()
                .is_some_and(|d| d.starts_with("The user executing the script can't")))
}

/// The refusal of `cmd` to `user`, naming the command and its keys, and reported.
fn named(error: &ServerError, cmd: &Cmd, user: &str) -> ::redis::RedisError {
    let reply = error.details().unwrap_or(error.code());
    let reply = reply.split(" script: ").next().unwrap_or(reply);
    let message = format!(
        "{REFUSED}{} to ACL user {user:?} ({reply}); grant it to that user (README: Redis ACL users)",
        describe(cmd)
    );
    ::redis::make_extension_error("NOPERM".into(), Some(message))
}

/// The text of a refused-command error made by this module, if `e` is one.
pub fn refusal(e: &::redis::RedisError) -> Option<&str> {
    e.detail()
        .filter(|d| e.code() == Some("NOPERM") && d.starts_with(REFUSED))
}

/// `LPUSH on "celery"`; `EVALSHA of settle-2.lua on` the in-flight list, `"celery"`.
fn describe(cmd: &Cmd) -> String {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            Arg::Simple(a) => Some(a),
            _ => None,
        })
        .collect();
    let Some((name, rest)) = args.split_first() else {
        return "a command".into();
    };
    let name = String::from_utf8_lossy(name).to_uppercase();
    let keys: &[&[u8]] = match name.as_str() {
        "EVALSHA" | "EVAL" | "EVALSHA_RO" | "EVAL_RO" => {
            let count = rest
                .get(1)
                .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok())
                .unwrap_or(0);
            rest.get(2..2 + count).unwrap_or_default()
        }
        "BLMOVE" | "LMOVE" | "RPOPLPUSH" | "SMOVE" => rest.get(..2).unwrap_or(rest),
        _ => rest.get(..1).unwrap_or_default(),
    };
    let script = match name.as_str() {
        "EVALSHA" | "EVALSHA_RO" => rest
            .first()
            .and_then(|sha| scripts::name_of(&String::from_utf8_lossy(sha)))
            .map(|file| format!(" of {file}")),
        _ => None,
    }
    .unwrap_or_default();
    if keys.is_empty() {
        return format!("{name}{script}");
    }
    let keys: Vec<String> = keys.iter().map(|k| shown(k)).collect();
    format!("{name}{script} on {}", keys.join(", "))
}

/// A key for a message: quoted, escaped (kombu's priority separator is two control bytes),
/// and cut short.
fn shown(key: &[u8]) -> String {
    let key = String::from_utf8_lossy(key);
    let mut shown: String = key.chars().take(80).collect();
    if key.chars().count() > 80 {
        shown.push('…');
    }
    format!("{shown:?}")
}

/// Every refusal in this process, newest last (none yet: `None`). A process-wide channel
/// because a refusal can come from any connection, whichever part opened it, and the worker
/// answers them all the same way: it stops.
pub fn refusals() -> watch::Receiver<Option<Arc<str>>> {
    channel().subscribe()
}

/// Reports a refusal (see [`refusals`]).
pub(super) fn report(message: &str) {
    channel().send_replace(Some(message.into()));
}

fn channel() -> &'static watch::Sender<Option<Arc<str>>> {
    static REFUSALS: OnceLock<watch::Sender<Option<Arc<str>>>> = OnceLock::new();
    REFUSALS.get_or_init(|| watch::channel(None).0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_command_is_named_with_its_key() {
        let mut cmd = ::redis::cmd("LPUSH");
        cmd.arg("celery\x06\x163").arg("message");
        assert_eq!(describe(&cmd), "LPUSH on \"celery\\u{6}\\u{16}3\"");
    }

    #[test]
    fn a_refused_script_is_named_by_its_file_and_keys() {
        let script = scripts::settle();
        let inflight = format!("{}celery", super::super::keys::inflight_prefix("w1"));
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(script.get_hash())
            .arg(2)
            .arg(&inflight)
            .arg("celery")
            .arg("message");
        assert_eq!(
            describe(&cmd),
            format!("EVALSHA of settle-2.lua on {inflight:?}, \"celery\"")
        );
    }

    #[test]
    fn a_script_refusal_counts_as_a_refusal_and_other_errors_do_not() {
        let in_script = ::redis::make_extension_error(
            "ERR".into(),
            Some("The user executing the script can't run this command or subcommand script: abc, on @user_script:1.".into()),
        );
        let wrong_type = ::redis::make_extension_error("WRONGTYPE".into(), None);
        let refused = |e: ::redis::RedisError| {
            e.into_server_errors()
                .is_some_and(|errors| errors.iter().any(|(_, e)| is_refusal(e)))
        };
        assert!(refused(in_script));
        assert!(!refused(wrong_type));
    }
}
