//! The house rules of `host/src`, checked on the source so that they stay rules and not hopes
//! (see `docs/architecture.md`):
//!
//! - each room (top-level module) imports only the rooms it is allowed to, and the allowed
//!   imports form no cycle; nor do the files within a room;
//! - `protocol` does no I/O; the sandbox never sees Redis; the Redis room knows no WebAssembly;
//!   only the Redis room talks to Redis;
//! - every `taskhost:*` key is named in `redis/keys.rs`, every Lua script is a file in
//!   `redis/scripts/` loaded by `redis/scripts.rs`;
//! - no file over 600 lines and no function over 80, unless a comment at its top says why.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each room and the rooms it may import. Lower rooms first; a room may only import rooms
/// listed before it, so the graph has no cycle (checked below too).
const ROOMS: &[(&str, &[&str])] = &[
    ("shutdown", &[]),
    ("node", &[]),
    ("signing", &[]),
    ("protocol", &[]),
    ("clock", &["protocol"]),
    ("redis", &["protocol", "clock", "shutdown", "node"]),
    ("config", &["redis", "node", "signing"]),
    ("telemetry", &["config", "protocol"]),
    ("sandbox", &["config", "protocol", "telemetry"]),
    (
        "plugins",
        &["sandbox", "config", "redis", "shutdown", "signing"],
    ),
    (
        "monitor",
        &[
            "protocol",
            "clock",
            "redis",
            "config",
            "telemetry",
            "shutdown",
        ],
    ),
    (
        "worker",
        &[
            "protocol",
            "clock",
            "redis",
            "config",
            "telemetry",
            "sandbox",
            "plugins",
            "monitor",
            "shutdown",
            "node",
        ],
    ),
    (
        "check",
        &["clock", "redis", "config", "sandbox", "plugins", "worker"],
    ),
    (
        "cli",
        &[
            "check",
            "protocol",
            "clock",
            "redis",
            "config",
            "telemetry",
            "sandbox",
            "plugins",
            "monitor",
            "worker",
            "shutdown",
            "node",
            "signing",
        ],
    ),
];

/// What a room must not name at all (beyond other rooms), and why.
const FORBIDDEN: &[(&str, &[&str], &str)] = &[
    (
        "protocol",
        &[
            "tokio",
            "redis::",
            "std::fs",
            "std::net",
            "std::env::var",
            "std::process::Command",
            "wasmtime",
        ],
        "protocol is pure: no I/O",
    ),
    ("sandbox", &["redis::"], "the sandbox never sees Redis"),
    (
        "redis",
        &["wasmtime"],
        "the Redis room knows no WebAssembly",
    ),
];

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 80;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every file under `dir` with the extension `ext`.
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read a source directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == ext) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The room a source file belongs to: its top-level module (`lib.rs`, `main.rs`: none).
fn room(path: &Path) -> Option<String> {
    let relative = path.strip_prefix(src()).expect("under src");
    let first = relative.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs");
    (name != "lib" && name != "main").then(|| name.to_owned())
}

/// The code of a file without comments (`//` to the end of the line), so that docs may name
/// anything.
fn code(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `code` names `path` as a path (not as the tail of a longer name).
fn names(code: &str, path: &str) -> bool {
    code.match_indices(path).any(|(at, _)| {
        let before = code[..at].chars().next_back();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
    })
}

fn rooms_imported(code: &str) -> BTreeSet<String> {
    ROOMS
        .iter()
        .map(|(room, _)| *room)
        .filter(|room| code.contains(&format!("crate::{room}")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn rooms_import_only_the_rooms_below_them() {
    let allowed: BTreeMap<&str, &[&str]> = ROOMS.iter().copied().collect();
    let mut wrong = Vec::new();
    for path in files(&src(), "rs") {
        let Some(room) = room(&path) else { continue };
        let Some(may) = allowed.get(room.as_str()) else {
            wrong.push(format!(
                "{}: room {room} is not in the layout table",
                path.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&path).expect("read a source file");
        for imported in rooms_imported(&code(&text)) {
            if imported != room && !may.contains(&imported.as_str()) {
                wrong.push(format!("{}: {room} imports {imported}", path.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layout:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_allowed_imports_form_no_cycle() {
    for (i, (room, may)) in ROOMS.iter().enumerate() {
        for imported in *may {
            let below = ROOMS[..i].iter().any(|(r, _)| r == imported);
            assert!(below, "{room} may import {imported}, which is not below it");
        }
    }
}

/// The identifiers following each `prefix` in `code`: `super::a` gives `a`, and
/// `super::{a, b::C}` gives `a` and `b`.
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let ident = |text: &str| -> String {
        text.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices(prefix) {
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                if item_start && depth == 0 {
                    out.insert(ident(&group[i..]));
                    item_start = false;
                }
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

#[test]
fn the_files_of_a_room_import_each_other_without_cycles() {
    for (room, _) in ROOMS {
        let dir = src().join(room);
        if !dir.is_dir() {
            continue;
        }
        // The room's modules: its files but mod.rs and the test files of a module.
        let modules: BTreeMap<String, PathBuf> = files(&dir, "rs")
            .into_iter()
            .filter(|p| p.parent() == Some(dir.as_path()))
            .filter_map(|p| {
                let stem = p.file_stem()?.to_string_lossy().into_owned();
                (stem != "mod" && !stem.ends_with("_tests")).then_some((stem, p))
            })
            .collect();
        let mut edges: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for (module, path) in &modules {
            let text = code(&std::fs::read_to_string(path).expect("read a source file"));
            let mut used = names_after(&text, "super::");
            used.extend(names_after(&text, &format!("crate::{room}::")));
            used.retain(|m| m != module && modules.contains_key(m));
            edges.insert(module, used);
        }
        // Depth-first search for a way back to where it started.
        for start in edges.keys() {
            let mut stack: Vec<Vec<&str>> = vec![vec![start]];
            while let Some(path) = stack.pop() {
                let last = *path.last().expect("a path is never empty");
                for next in edges.get(last).into_iter().flatten() {
                    assert!(
                        next != start,
                        "an import cycle in {room}/: {} -> {next}",
                        path.join(" -> ")
                    );
                    if !path.contains(&next.as_str()) {
                        let mut longer = path.clone();
                        longer.push(next);
                        stack.push(longer);
                    }
                }
            }
        }
    }
}

#[test]
fn names_after_reads_grouped_imports() {
    let found = names_after(
        "use super::{Shared, gates::{self, Admitted}, settle};",
        "super::",
    );
    assert_eq!(
        found,
        BTreeSet::from(["Shared".into(), "gates".into(), "settle".into()])
    );
}

#[test]
fn rooms_name_nothing_they_must_not() {
    let mut wrong = Vec::new();
    for path in files(&src(), "rs") {
        let Some(room) = room(&path) else { continue };
        let text = code(&std::fs::read_to_string(&path).expect("read a source file"));
        for (forbidden_in, paths, why) in FORBIDDEN {
            if room != *forbidden_in {
                continue;
            }
            for p in *paths {
                if names(&text, p) {
                    wrong.push(format!("{}: names {p} ({why})", path.display()));
                }
            }
        }
        // Only the Redis room talks to Redis.
        if room != "redis" && names(&text, "redis::") {
            wrong.push(format!(
                "{}: uses the redis crate outside the Redis room",
                path.display()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn protocol_reads_no_clock_and_no_process() {
    const READS: &[&str] = &["now_utc", "SystemTime", "Instant::now", "process::id"];
    let mut wrong = Vec::new();
    for path in files(&src().join("protocol"), "rs") {
        let text = code(&std::fs::read_to_string(&path).expect("read a source file"));
        for read in READS.iter().filter(|r| text.contains(*r)) {
            wrong.push(format!(
                "{}: reads {read} (time and names come into protocol as arguments)",
                path.display()
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The `taskhost:*` key and channel names `redis/keys.rs` defines, each up to its first
/// character that is not part of a name (`taskhost:inflight:` for `taskhost:inflight:{node}:`).
fn defined_keys(keys_rs: &str) -> BTreeSet<String> {
    let text = code(keys_rs);
    text.match_indices("taskhost:")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, ':' | '-' | '_')
                })
                .collect()
        })
        .collect()
}

#[test]
fn every_taskhost_key_is_named_in_keys_rs() {
    let keys_rs = src().join("redis").join("keys.rs");
    let keys = defined_keys(&std::fs::read_to_string(&keys_rs).expect("read keys.rs"));
    assert!(keys.contains("taskhost:delayed"), "{keys:?}");
    let mut wrong = Vec::new();
    for path in files(&src(), "rs") {
        if path == keys_rs {
            continue;
        }
        let text = code(&std::fs::read_to_string(&path).expect("read a source file"));
        for key in &keys {
            if text.contains(key.as_str()) {
                wrong.push(format!("{}: names {key}", path.display()));
            }
        }
        // In the Redis room any such string is a key: ours are all in keys.rs.
        if room(&path).as_deref() == Some("redis") && text.contains("\"taskhost:") {
            wrong.push(format!(
                "{}: a taskhost: key outside keys.rs",
                path.display()
            ));
        }
        if path != src().join("redis").join("scripts.rs") && text.contains("Script::new(") {
            wrong.push(format!(
                "{}: a Lua script outside redis/scripts/",
                path.display()
            ));
        }
    }
    for path in files(&src().join("redis").join("scripts"), "lua") {
        let text = std::fs::read_to_string(&path).expect("read a script");
        let body = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<String>();
        if body.contains("taskhost:") {
            wrong.push(format!(
                "{}: names a key (pass it in KEYS or ARGV)",
                path.display()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "key names or scripts outside their place:\n{}",
        wrong.join("\n")
    );
}

/// Whether the lines before `at` (its doc and attributes) say why it is long.
fn excused(lines: &[&str], at: usize) -> bool {
    lines[..at]
        .iter()
        .rev()
        .take_while(|l| {
            let l = l.trim_start();
            l.starts_with("///") || l.starts_with("//") || l.starts_with("#[")
        })
        .any(|l| l.contains("longer than"))
}

/// The offset of the line closing the function whose first line is `lines[0]`, at `indent`;
/// none for a declaration without a body, or a one-line function.
fn body_end(lines: &[&str], indent: &str) -> Option<usize> {
    let close = format!("{indent}}}");
    if lines[0].trim_end().ends_with('}') {
        return None;
    }
    for (offset, line) in lines.iter().enumerate() {
        if *line == close {
            return Some(offset);
        }
        let at_indent = line
            .strip_prefix(indent)
            .is_some_and(|rest| !rest.starts_with(' '));
        if at_indent && line.trim_end().ends_with(';') {
            return None;
        }
    }
    None
}

/// The functions of a (rustfmt-formatted) file longer than `max` lines: (name, first line,
/// length).
fn long_functions(text: &str, max: usize) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(fn_at) = trimmed.find("fn ") else {
            continue;
        };
        let head = &trimmed[..fn_at];
        let is_fn = head
            .split_whitespace()
            .all(|w| matches!(w, "pub" | "async" | "const" | "unsafe") || w.starts_with("pub("));
        if !is_fn {
            continue;
        }
        let indent = &line[..line.len() - trimmed.len()];
        let Some(end) = body_end(&lines[at..], indent) else {
            continue;
        };
        let length = end + 1;
        if length > max && !excused(&lines, at) {
            let name = trimmed[fn_at + 3..]
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .next()
                .unwrap_or("?")
                .to_owned();
            out.push((name, at + 1, length));
        }
    }
    out
}

#[test]
fn no_file_over_600_lines_and_no_function_over_80() {
    let mut wrong = Vec::new();
    for path in files(&src(), "rs") {
        let text = std::fs::read_to_string(&path).expect("read a source file");
        let lines: Vec<&str> = text.lines().collect();
        let head_excuses = lines.iter().take(10).any(|l| l.contains("longer than"));
        if lines.len() > MAX_FILE_LINES && !head_excuses {
            wrong.push(format!("{}: {} lines", path.display(), lines.len()));
        }
        for (name, line, length) in long_functions(&text, MAX_FN_LINES) {
            wrong.push(format!(
                "{}:{line}: fn {name} is {length} lines",
                path.display()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "over the size rules:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_function_measure_finds_long_functions() {
    let body: String = (0..90).map(|i| format!("    let x{i} = {i};\n")).collect();
    let text = format!("fn short() {{\n}}\n\npub async fn long() {{\n{body}}}\n");
    assert_eq!(long_functions(&text, 80), [("long".to_owned(), 4, 92)]);
    let excused = format!("// longer than 80 lines because it is a test\n{text}");
    assert_eq!(
        long_functions(&excused, 80).len(),
        1,
        "the excuse is for the first fn only"
    );
}

#[test]
fn every_source_file_is_named_in_the_architecture_page() {
    let page = std::fs::read_to_string(src().join("../../docs/architecture.md"))
        .expect("read docs/architecture.md");
    let missing: Vec<String> = files(&src(), "rs")
        .into_iter()
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.to_owned();
            let unit_tests = name.ends_with("_tests.rs");
            (!unit_tests && !page.contains(&format!("`{name}`")))
                .then(|| path.display().to_string())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md names every file of host/src, in its room; these are not:\n{}",
        missing.join("\n")
    );
}
