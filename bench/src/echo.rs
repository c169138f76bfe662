//! The floor for a worker: a native echo worker with no sandbox and nothing else. One loop
//! pops a message (`BRPOP`), decodes it with the host's own decoder, computes the demo
//! plugin's answer natively, and stores and publishes the result (`SET EX` + `PUBLISH`,
//! pipelined, one connection): what a Celery worker cannot do with less. `taskhost-bench
//! --echo-worker BROKER BACKEND` runs it, as a process of its own so that its CPU and memory
//! are measured as a worker's.

use serde_json::{Value, json};
use taskhost::protocol::{TaskMessage, result_document};

/// Serves the `celery` queue until killed.
pub fn serve(broker: &str, backend: &str) -> ! {
    let connect = |url: &str| {
        redis::Client::open(url)
            .and_then(|c| c.get_connection())
            .unwrap_or_else(|e| panic!("echo worker: cannot connect to {url}: {e}"))
    };
    let (mut broker, mut backend) = (connect(broker), connect(backend));
    println!("echo worker ready");
    loop {
        let popped: Option<(String, Vec<u8>)> = redis::cmd("BRPOP")
            .arg("celery")
            .arg(1)
            .query(&mut broker)
            .unwrap_or_else(|e| panic!("echo worker: BRPOP failed: {e}"));
        let Some((_, raw)) = popped else { continue };
        let Ok(message) = TaskMessage::decode(&raw) else {
            eprintln!("echo worker: an undecodable message");
            continue;
        };
        let args: Value = serde_json::from_str(message.args.get()).unwrap_or(Value::Null);
        let mut pipe = redis::pipe();
        let mut store = |status: &str, result: &Value| {
            let now = time::OffsetDateTime::now_utc();
            let doc = result_document(&message.meta(), status, result, None, now);
            crate::ceiling::add_result(&mut pipe, &message.id, &doc);
        };
        match message.task.as_str() {
            "demo.add" => store(
                "SUCCESS",
                &json!(args[0].as_i64().unwrap_or(0) + args[1].as_i64().unwrap_or(0)),
            ),
            "demo.progress" => {
                store("PROGRESS", &json!({"step": 1}));
                store("SUCCESS", &args[0]);
            }
            _ => store("SUCCESS", &args[0]),
        }
        pipe.exec(&mut backend)
            .unwrap_or_else(|e| panic!("echo worker: storing a result failed: {e}"));
    }
}
