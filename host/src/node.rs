//! This worker's identity: the machine's hostname and the Celery node name built from it
//! (`celery@host` by default, with Celery's `%h`, `%n` and `%d` expansions).

/// The machine's hostname, as the kernel reports it.
pub fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Where messages this process sends come from, as Celery names it: `gen<pid>@<hostname>`.
pub fn origin() -> String {
    format!("gen{}@{}", std::process::id(), machine_hostname())
}

/// Expands a node name as Celery's `--hostname` does: `%h` the full hostname, `%n` its first
/// label, `%d` the rest (the domain). A name without `@` gets `celery@` in front.
pub fn node_name(template: Option<&str>) -> String {
    let host = machine_hostname();
    let (short, domain) = host.split_once('.').unwrap_or((host.as_str(), ""));
    let name = template
        .unwrap_or("celery@%h")
        .replace("%h", &host)
        .replace("%n", short)
        .replace("%d", domain);
    if name.contains('@') {
        name
    } else {
        format!("celery@{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_celery() {
        let host = machine_hostname();
        assert_eq!(node_name(None), format!("celery@{host}"));
        assert_eq!(node_name(Some("w1@x")), "w1@x");
        assert_eq!(node_name(Some("w2")), "celery@w2");
        assert!(node_name(Some("a@%n")).starts_with("a@"));
    }
}
