//! This process's resource usage as Celery's `stats.rusage` reports it, read from /proc.

use serde_json::{Value, json};

/// This process's resource usage, as Celery's `stats.rusage` (from /proc: the fields Linux
/// keeps; CPU times in seconds at the kernel's usual 100 ticks per second).
pub(super) fn rusage() -> Value {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| {
        fields
            .get(n)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let status_field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // In /proc/self/stat after the name: state is 0, minflt 7, majflt 9, utime 11, stime 12.
    json!({
        "utime": field(11) as f64 / 100.0,
        "stime": field(12) as f64 / 100.0,
        "maxrss": status_field("VmHWM:"),
        "minflt": field(7),
        "majflt": field(9),
        "nvcsw": status_field("voluntary_ctxt_switches:"),
        "nivcsw": status_field("nonvoluntary_ctxt_switches:"),
    })
}
