//! The Redis ceiling: the same per-task Redis work a worker does, with no task run at all and
//! as much pipelining as the commands allow. No worker can beat it on this Redis.

use crate::workload::Workload;
use std::time::Instant;
use taskhost::redis::settle::Stores;
use taskhost::redis::{Backend, Broker};
use taskhost::worker::{DeadLetters, RedisSink, Settler};

/// Tasks moved per round of the ceiling loops.
const BATCH: usize = 64;

/// Stages the workload on the queue (as a drain does) and returns the broker connection.
fn staged(url: &str, workload: &Workload) -> redis::Connection {
    let client = redis::Client::open(url).expect("Redis URL");
    let mut conn = client.get_connection().expect("connect to Redis");
    redis::cmd("FLUSHALL").exec(&mut conn).expect("FLUSHALL");
    let mut pipe = redis::pipe();
    for chunk in workload.messages.chunks(500) {
        pipe.cmd("LPUSH").arg("celery").arg(chunk).ignore();
    }
    pipe.exec(&mut conn).expect("stage the messages");
    conn
}

/// Adds to `pipe` what a Celery result backend does for task `id`'s result `doc`: store it with
/// a day's expiry, publish it.
pub fn add_result(pipe: &mut redis::Pipeline, id: &str, doc: &str) {
    let key = taskhost::redis::keys::result_key(id);
    pipe.cmd("SET")
        .arg(&key)
        .arg(doc)
        .arg("EX")
        .arg(86_400)
        .ignore();
    pipe.cmd("PUBLISH").arg(&key).arg(doc).ignore();
}

/// The least any Celery-compatible worker must do per task: pop the message, store the result
/// with its expiry, publish it; pipelined `BATCH` tasks at a time. Tasks/s.
pub fn bare(broker_url: &str, backend_url: &str, workload: &Workload) -> f64 {
    let mut broker = staged(broker_url, workload);
    let mut backend = redis::Client::open(backend_url)
        .and_then(|c| c.get_connection())
        .expect("connect to the backend");
    let doc = result_like(workload);
    let start = Instant::now();
    let mut done = 0;
    loop {
        let popped: Option<Vec<Vec<u8>>> = redis::cmd("RPOP")
            .arg("celery")
            .arg(BATCH)
            .query(&mut broker)
            .expect("RPOP");
        let Some(popped) = popped else { break };
        let mut pipe = redis::pipe();
        for _ in &popped {
            add_result(&mut pipe, &uuid::Uuid::new_v4().to_string(), &doc);
        }
        pipe.exec(&mut backend).expect("store results");
        done += popped.len();
    }
    assert_eq!(done, workload.messages.len());
    done as f64 / start.elapsed().as_secs_f64()
}

/// taskhost's own per-task Redis work, through the host's own code: the atomic batch fetch
/// into the in-flight list, then the settler's batches (result stored with its expiry and
/// published, message acknowledged); `BATCH` tasks at a time. Tasks/s.
pub fn taskhost(broker_url: &str, backend_url: &str, workload: &Workload) -> f64 {
    drop(staged(broker_url, workload));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let broker = Broker::connect(broker_url, "ceiling@bench")
            .await
            .expect("connect the broker");
        let backend = Backend::connect(
            backend_url,
            taskhost::config::resolve::DEFAULT_RESULT_EXPIRES,
        )
        .await
        .expect("connect the backend");
        let keys = taskhost::redis::keys::source_keys(&["celery".to_owned()]);
        let settler = Settler::start(RedisSink {
            stores: Stores {
                broker: broker.clone(),
                backend,
                wait_replicas: taskhost::redis::settle::ReplicaWait::new(0),
            },
            dead_letters: DeadLetters::new(
                broker.clone(),
                "ceiling@bench".to_owned(),
                std::sync::Arc::default(),
                taskhost::config::resolve::DEFAULT_DEAD_LETTER_MAX,
            ),
        });
        let doc = result_like(workload);
        let start = Instant::now();
        let mut done = 0;
        loop {
            let fetched = broker.fetch(&keys, BATCH).await.expect("fetch");
            if fetched.is_empty() {
                break;
            }
            let settles = fetched.iter().map(|delivery| {
                let (doc, settler) = (&doc, &settler);
                async move {
                    let id = taskhost::protocol::TaskMessage::decode(&delivery.raw)
                        .map(|m| m.id)
                        .expect("a bench message decodes");
                    settler
                        .settle(&id, Some(doc.clone()), delivery, Vec::new())
                        .await;
                }
            });
            futures_util::future::join_all(settles).await;
            done += fetched.len();
        }
        assert_eq!(done, workload.messages.len());
        done as f64 / start.elapsed().as_secs_f64()
    })
}

/// A result document of the size the workload's results have.
fn result_like(workload: &Workload) -> String {
    taskhost::protocol::result_document(
        &taskhost::protocol::Meta::of("00000000-0000-0000-0000-000000000000"),
        "SUCCESS",
        &workload.expected,
        None,
        time::OffsetDateTime::now_utc(),
    )
}
