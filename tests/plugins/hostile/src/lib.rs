//! A plugin that tries everything a hostile or broken plugin might: spin, hoard memory,
//! recurse without end, return a huge result, flood its output, panic, and reach for files,
//! the environment, sockets, hosts it was not granted and another plugin's config. The sandbox
//! tests run each through a real worker; a capability attempt that *succeeds* returns what it
//! got, so a breach shows up as a wrong result. `remember` shows what an instance kept for
//! reuse carries from one task to the next.

use serde_json::{Value, json};
use std::hint::black_box;
use taskhost_sdk::{Failure, Result, tasks};
use wstd::http::{Body, Client, ErrorCode, Request};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn denied(what: &str, error: impl std::fmt::Display) -> Failure {
    Failure::error("CapabilityDenied", format!("{what}: {error}"))
}

/// Plain recursion, as a buggy plugin would write it: small frames, no end.
#[inline(never)]
fn deep(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let below = deep(n - 1);
    // Not an accumulation the optimiser could turn into a loop.
    below.rotate_left(7) ^ n
}

tasks! {
    /// Sends `signature` exactly as given: whatever ids, options and queues it names.
    #[task(name = "hostile.send_raw")]
    fn send_raw(signature: Value) -> Result<Value> {
        match taskhost_sdk::canvas::Signature::from_json(signature).send() {
            Ok(id) => Ok(json!({"sent": id})),
            Err(why) => Ok(json!({"refused": why})),
        }
    }

    /// Reports spans through `wasi:otel` as a hostile plugin would (`mode`): into another
    /// trace (`foreign`), never started (`unstarted`), under a parent it never started
    /// (`orphan`), 2,000 of them (`flood`), or with times and sizes out of all bounds
    /// (`huge`). Returns how many it reported.
    #[task(name = "hostile.spans")]
    fn spans(mode: String) -> Result<u32> {
        use taskhost_sdk::otel::wasi::clocks::wall_clock::Datetime;
        use taskhost_sdk::otel::wasi::otel::tracing as t;
        use taskhost_sdk::otel::wasi::otel::types::{InstrumentationScope, KeyValue};
        let outer = t::outer_span_context();
        let context = |trace_id: &str, id: u64| t::SpanContext {
            trace_id: trace_id.to_owned(),
            span_id: format!("{id:016x}"),
            trace_flags: outer.trace_flags,
            is_remote: false,
            trace_state: Vec::new(),
        };
        let at = |seconds: u64| Datetime { seconds, nanoseconds: 0 };
        let now = now_ms() / 1000;
        let data = |context: t::SpanContext, parent: &str, name: String, attributes: Vec<KeyValue>, start: Datetime, end: Datetime| t::SpanData {
            span_context: context,
            parent_span_id: parent.to_owned(),
            span_kind: t::SpanKind::Internal,
            name,
            start_time: start,
            end_time: end,
            attributes,
            events: Vec::new(),
            links: Vec::new(),
            status: t::Status::Unset,
            instrumentation_scope: InstrumentationScope {
                name: "hostile".into(),
                version: None,
                schema_url: None,
                attributes: Vec::new(),
            },
            dropped_attributes: 0,
            dropped_events: 0,
            dropped_links: 0,
        };
        let report = |c: t::SpanContext, parent: &str, name: &str, start: bool| {
            if start {
                t::on_start(&c);
            }
            t::on_end(&data(c, parent, name.to_owned(), Vec::new(), at(now), at(now)));
        };
        let n = match mode.as_str() {
            "foreign" => {
                report(context(&"f".repeat(32), 1), &outer.span_id, "foreign", true);
                1
            }
            "unstarted" => {
                report(context(&outer.trace_id, 2), &outer.span_id, "unstarted", false);
                1
            }
            "orphan" => {
                report(context(&outer.trace_id, 3), "00000000000000aa", "orphan", true);
                1
            }
            "flood" => {
                for id in 1..=2_000u64 {
                    report(context(&outer.trace_id, 0x1000 + id), &outer.span_id, "flood", true);
                }
                2_000
            }
            "huge" => {
                let c = context(&outer.trace_id, 4);
                t::on_start(&c);
                let attributes = (0..500)
                    .map(|i| KeyValue {
                        key: format!("k{i}"),
                        value: serde_json::Value::from("v".repeat(100_000)).to_string(),
                    })
                    .collect();
                let name = "n".repeat(100_000);
                t::on_end(&data(c, &outer.span_id, name, attributes, at(0), at(u64::MAX / 2)));
                1
            }
            other => return Err(Failure::error("ValueError", format!("no mode {other}"))),
        };
        Ok(n)
    }

    /// Never returns.
    #[task(name = "hostile.spin")]
    fn spin() -> Result<()> {
        let mut n = 0u64;
        loop {
            n = black_box(n.wrapping_add(1));
        }
    }

    /// Works until its soft deadline, then returns what it did.
    #[task(name = "hostile.until_soft_limit")]
    fn until_soft_limit() -> Result<Value> {
        let Some(deadline) = taskhost_sdk::task().soft_deadline_ms else {
            return Err(Failure::error("ValueError", "no soft time limit was given"));
        };
        let mut rounds = 0u64;
        while now_ms() < deadline {
            rounds = black_box(rounds + 1);
        }
        Ok(json!({"stopped": "soft time limit", "rounds_done": rounds > 0}))
    }

    /// Allocates `mb` MiB at once.
    #[task(name = "hostile.memory_bomb")]
    fn memory_bomb(mb: u64) -> Result<u64> {
        let size = usize::try_from(mb << 20).unwrap_or(usize::MAX);
        let hoard = black_box(vec![1u8; size]);
        Ok(hoard.iter().map(|b| u64::from(*b)).sum())
    }

    /// Recurses `depth` levels.
    #[task(name = "hostile.recurse")]
    fn recurse(depth: u64) -> Result<u64> {
        Ok(deep(black_box(depth)))
    }

    /// Returns a string of `mb` MiB.
    #[task(name = "hostile.big_result")]
    fn big_result(mb: u64) -> Result<String> {
        Ok("x".repeat(usize::try_from(mb << 20).unwrap_or(usize::MAX)))
    }

    /// Prints `lines` lines to stdout and to stderr.
    #[task(name = "hostile.flood")]
    fn flood(lines: u64) -> Result<u64> {
        for i in 0..lines {
            println!("flood line {i} {}", "x".repeat(100));
            eprintln!("flood line {i} on stderr");
        }
        Ok(lines)
    }

    /// Panics with `message`.
    #[task(name = "hostile.panic")]
    fn panic(message: String) -> Result<()> {
        panic!("{message}")
    }

    /// Reads a file of the host.
    #[task(name = "hostile.read_file")]
    fn read_file(path: String) -> Result<String> {
        std::fs::read_to_string(&path).map_err(|e| denied(&format!("open {path}"), e))
    }

    /// Reads the environment.
    #[task(name = "hostile.read_env")]
    fn read_env() -> Result<Value> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        if vars.is_empty() {
            return Err(denied("environment", "no variables are visible"));
        }
        Ok(json!(vars))
    }

    /// Opens a TCP connection to `addr`.
    #[task(name = "hostile.connect")]
    fn connect(addr: String) -> Result<()> {
        std::net::TcpStream::connect(&addr)
            .map(|_| ())
            .map_err(|e| denied(&format!("connect {addr}"), e))
    }

    /// GETs `url`, following one redirect itself if `follow`.
    #[task(name = "hostile.http_get")]
    fn http_get(url: String, follow: bool) -> Result<Value> {
        let first = get(&url)?;
        if follow && (300..400).contains(&first.0) {
            let location = first.2.ok_or_else(|| Failure::error("ValueError", "redirect without a location"))?;
            let (status, body, _) = get(&location)?;
            return Ok(json!({"status": status, "body": body, "redirected_to": location}));
        }
        Ok(json!({"status": first.0, "body": first.1}))
    }

    /// Reads config value `key` (its own, or one meant for another plugin).
    #[task(name = "hostile.read_config")]
    fn read_config(key: String) -> Result<Option<String>> {
        Ok(taskhost_sdk::config(&key))
    }

    /// Writes `state` as its progress (a forged `SUCCESS`, say) with a forged value, then
    /// returns what the host answered: `{"refused": why}` or `{"accepted": true}`.
    #[task(name = "hostile.forge_state")]
    fn forge_state(state: String) -> Result<Value> {
        match taskhost_sdk::update_state(&state, &json!("forged by the plugin")) {
            Ok(()) => Ok(json!({"accepted": true})),
            Err(why) => Ok(json!({"refused": why})),
        }
    }

    /// Calls `update_state` `times` times as fast as it can; returns how many were accepted.
    #[task(name = "hostile.progress_flood")]
    fn progress_flood(times: u64) -> Result<u64> {
        let mut accepted = 0;
        for n in 0..times {
            if taskhost_sdk::update_state("PROGRESS", &json!({"n": n})).is_ok() {
                accepted += 1;
            }
        }
        Ok(accepted)
    }

    /// Fails with a message of `mb` MiB and a traceback as long.
    #[task(name = "hostile.huge_error")]
    fn huge_error(mb: u64) -> Result<()> {
        let text = "e".repeat(usize::try_from(mb << 20).unwrap_or(usize::MAX));
        Err(Failure::error("RuntimeError", text.clone()).with_traceback(text))
    }

    /// Holds `n` HTTP fields resources at once (never dropped while it runs).
    #[task(name = "hostile.resource_flood")]
    fn resource_flood(n: u64) -> Result<u64> {
        let held: Vec<wasip2::http::types::Fields> =
            (0..n).map(|_| wasip2::http::types::Fields::new()).collect();
        Ok(held.len() as u64)
    }

    /// Appends 1 KiB header values to one fields resource until the host refuses (an error it
    /// returns, or a trap past the fields' size limit); returns how many it took.
    #[task(name = "hostile.header_flood")]
    fn header_flood() -> Result<Value> {
        let fields = wasip2::http::types::Fields::new();
        let value = vec![b'v'; 1024];
        for n in 0..1_000_000u64 {
            if let Err(e) = fields.append("x-flood", &value) {
                return Ok(json!({"appended": n, "refused": format!("{e:?}")}));
            }
        }
        Ok(json!({"appended": 1_000_000, "refused": null}))
    }

    /// Sends `n` GETs to `url` at once; returns how many got an answer and the errors.
    #[task(name = "hostile.http_swarm")]
    fn http_swarm(url: String, n: u64) -> Result<Value> {
        let results = wstd::runtime::block_on(async move {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let url = url.clone();
                    wstd::runtime::spawn(async move {
                        let request = Request::get(&url).body(Body::empty()).map_err(|e| e.to_string())?;
                        Client::new()
                            .send(request)
                            .await
                            .map(|r| r.status().as_u16())
                            .map_err(|e| format!("{e:#}"))
                    })
                })
                .collect();
            let mut results = Vec::new();
            for task in tasks {
                results.push(task.await);
            }
            results
        });
        let answered = results.iter().filter(|r| r.is_ok()).count();
        let errors: Vec<String> = results.into_iter().filter_map(|r| r.err()).collect();
        Ok(json!({"answered": answered, "errors": errors}))
    }

    /// Sleeps `ms` and reports when it started and ended.
    #[task(name = "hostile.hold")]
    fn hold(ms: u64) -> Result<Value> {
        let start = now_ms();
        // On a WASI timer, as any plugin waiting for something would.
        wstd::runtime::block_on(async {
            wstd::task::sleep(wstd::time::Duration::from_millis(ms)).await;
        });
        Ok(json!({"start": start, "end": now_ms()}))
    }

    /// Keeps `value` in the instance's memory and returns what the previous task of this
    /// instance kept: null in a fresh instance. What `reuse_instances` lets one task see of an
    /// earlier one.
    #[task(name = "hostile.remember")]
    fn remember(value: Value) -> Result<Value> {
        static KEPT: std::sync::Mutex<Option<Value>> = std::sync::Mutex::new(None);
        let mut kept = KEPT
            .lock()
            .map_err(|_| Failure::error("RuntimeError", "an earlier task panicked holding it"))?;
        Ok(kept.replace(value).unwrap_or(Value::Null))
    }

    /// Opens a stream (its own stdout) and leaves it open, forgotten: returns the handle
    /// number a later task could try to use.
    #[task(name = "hostile.leave_handle")]
    fn leave_handle() -> Result<u32> {
        let stream = wasip2::cli::stdout::get_stdout();
        let handle = stream.handle();
        std::mem::forget(stream);
        Ok(handle)
    }

    /// Uses the handle number an earlier task left, before opening anything itself: succeeds
    /// (and says how much the stream would take) only if that handle is still there.
    #[task(name = "hostile.use_handle")]
    #[allow(unsafe_code)]
    fn use_handle(handle: u32) -> Result<u64> {
        // SAFETY: this is the attack: a handle number this task never received.
        let stream = unsafe { wasip2::io::streams::OutputStream::from_handle(handle) };
        let room = stream
            .check_write()
            .map_err(|e| Failure::error("StreamError", format!("{e:?}")))?;
        std::mem::forget(stream);
        Ok(room)
    }

    /// Looks for what an earlier task left in this instance's memory, then leaves `secret`
    /// there: in a static, and in a heap block freed before returning (its bytes stay where
    /// they were until something overwrites them). Returns the earlier secrets it found by
    /// scanning all of linear memory for the marker.
    #[task(name = "hostile.find_and_leave")]
    fn find_and_leave(secret: String) -> Result<Value> {
        static LEFT: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
        // Made at run time, so the marker is nowhere in the plugin's image.
        let marker: Vec<u8> = format!("probe{}:", 7 * 6).into_bytes();
        let own = [marker.as_slice(), secret.as_bytes(), b";"].concat();
        let heap = scan_memory(&marker, &own);
        let mut left = LEFT
            .lock()
            .map_err(|_| Failure::error("RuntimeError", "an earlier task panicked holding it"))?;
        let global = left.replace(secret);
        drop(black_box(own.repeat(64)));
        Ok(json!({"global": global, "heap": heap}))
    }
}

/// Every `marker...;` string in linear memory other than `own` (which this task made).
#[allow(unsafe_code)]
fn scan_memory(marker: &[u8], own: &[u8]) -> Vec<String> {
    let size = core::arch::wasm32::memory_size(0) * 65536;
    // SAFETY: every address below the memory's size is readable in WebAssembly; the scan
    // only reads, byte by byte, volatile so it is not optimised on the assumption that
    // nothing else is there.
    let byte = |at: usize| unsafe { core::ptr::read_volatile(at as *const u8) };
    let mut found = Vec::new();
    let mut at = 1;
    while at + marker.len() < size {
        if (0..marker.len()).all(|i| byte(at + i) == marker[i]) {
            // A secret is letters, digits and dashes up to the `;`; anything else after a
            // marker is not one (the marker's own bytes, say, followed by other data).
            let secret = |i: usize| byte(i).is_ascii_alphanumeric() || byte(i) == b'-';
            let start = at + marker.len();
            let end = (start..size.min(start + 256)).find(|&i| !secret(i));
            if let Some(end) = end.filter(|&end| end > start && byte(end) == b';') {
                let bytes: Vec<u8> = (at..=end).map(byte).collect();
                if bytes != own && !found.contains(&String::from_utf8_lossy(&bytes).into_owned()) {
                    found.push(String::from_utf8_lossy(&bytes).into_owned());
                }
            }
        }
        at += 1;
    }
    found
}

/// (status, body, location) of a GET.
fn get(url: &str) -> Result<(u16, String, Option<String>)> {
    wstd::runtime::block_on(async {
        let request = Request::get(url)
            .body(Body::empty())
            .map_err(|e| Failure::error("ValueError", e.to_string()))?;
        let mut response = match Client::new().send(request).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(ErrorCode::HttpRequestDenied) = e.downcast_ref::<ErrorCode>() {
                    return Err(denied(&format!("GET {url}"), "HTTP request denied"));
                }
                return Err(Failure::error(
                    "ConnectionError",
                    format!("GET {url}: {e:#}"),
                ));
            }
        };
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .str_contents()
            .await
            .map(str::to_owned)
            .map_err(|e| Failure::error("ConnectionError", format!("GET {url}: body: {e:#}")))?;
        Ok((status, body, location))
    })
}
