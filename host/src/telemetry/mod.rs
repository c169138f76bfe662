//! Distributed tracing with OpenTelemetry: the producer's trace goes on through the worker
//! (a `run/<task>` span per task, under the span that sent its message) and out with every
//! message the worker publishes, exported over OTLP/HTTP.
//!
//! - [`span`]: a task's spans and their attributes, the context published messages carry.
//! - [`export`]: the bounded queue and export thread, with its counts of spans lost.
//! - [`guest`]: the spans a plugin makes (`wasi:otel`), checked and bounded.
//! - [`otlp`]: a batch as the OTLP/HTTP protobuf body, and the exporter posting it.
//! - [`http`]: the POST of a batch to the collector.
//!
//! Off (the default), no tracer exists: the task path's calls find no current span and
//! return at once.

pub mod export;
pub mod guest;
pub mod http;
pub mod otlp;
pub mod span;

use crate::config::{Sampling, TracingConfig, tracing::Root};
use anyhow::Context as _;
use export::{Batcher, SpanTotals};
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use std::sync::OnceLock;
use std::time::Duration;

/// The process's tracer, set once when tracing starts (a worker traces with one provider for
/// its life, as OpenTelemetry's global tracer).
static TRACER: OnceLock<SdkTracer> = OnceLock::new();
/// The export queue, set with the tracer: where plugins' spans go too.
static BATCHER: OnceLock<Batcher> = OnceLock::new();

fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

fn batcher() -> Option<&'static Batcher> {
    BATCHER.get()
}

/// Tracing, started: the provider and what it has exported.
pub struct Telemetry {
    provider: SdkTracerProvider,
    batcher: Batcher,
}

impl Telemetry {
    /// Starts exporting to `config`'s collector, as `node`. Nothing connects yet: the first
    /// batch does.
    ///
    /// # Errors
    /// A header that cannot be sent over HTTP, or tracing was
    /// started before in this process.
    pub fn start(config: &TracingConfig, node: &str) -> anyhow::Result<Self> {
        let mut resource = Resource::builder_empty()
            .with_detector(Box::new(
                opentelemetry_sdk::resource::TelemetryResourceDetector,
            ))
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("service.instance.id", node.to_owned()),
            ]);
        resource = resource
            .with_attributes(
                config
                    .resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .with_service_name(config.service_name.clone());
        let resource = resource.build();
        let exporter = otlp::OtlpExporter::new(
            &config.endpoint,
            &config.headers,
            config.timeout,
            resource.clone(),
        )?;
        let batcher =
            Batcher::start(exporter, config.batching).context("starting the span export thread")?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batcher.clone())
            .with_sampler(sampler(config.sampling))
            .with_resource(resource)
            .build();
        let twice = || anyhow::anyhow!("tracing was started twice in one process");
        BATCHER.set(batcher.clone()).map_err(|_| twice())?;
        TRACER
            .set(provider.tracer("taskhost"))
            .map_err(|_| twice())?;
        tracing::info!(endpoint = %config.endpoint, "tracing: spans go to the OTLP collector");
        Ok(Self { provider, batcher })
    }

    /// Spans exported and lost so far.
    pub fn totals(&self) -> SpanTotals {
        self.batcher.counts().totals()
    }

    /// Exports what is queued and stops, waiting at most `within` (blocking: call it off the
    /// async runtime's threads).
    pub fn stop(&self, within: Duration) {
        if let Err(e) = self.provider.shutdown_with_timeout(within) {
            tracing::warn!("tracing: the last spans may be lost: {e}");
        }
    }
}

fn sampler(sampling: Sampling) -> Sampler {
    let root = |root: Root| match root {
        Root::AlwaysOn => Sampler::AlwaysOn,
        Root::AlwaysOff => Sampler::AlwaysOff,
        Root::Ratio(r) => Sampler::TraceIdRatioBased(r),
    };
    match sampling {
        Sampling::AlwaysOn => Sampler::AlwaysOn,
        Sampling::AlwaysOff => Sampler::AlwaysOff,
        Sampling::Ratio(r) => Sampler::TraceIdRatioBased(r),
        Sampling::ParentBased(r) => Sampler::ParentBased(Box::new(root(r))),
    }
}
