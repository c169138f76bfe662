//! Whether and where a worker sends its traces: OpenTelemetry's standard `OTEL_*` variables
//! over `taskhost.toml`'s `[tracing]` section (the variables win, as `CELERY_*` win over
//! `[worker]`), resolved and checked before anything connects.
//!
//! Tracing is on when an OTLP endpoint is named (by a variable or the file), when
//! `OTEL_TRACES_EXPORTER=otlp`, or when `[tracing] enabled = true`; `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` turn it off whatever else says. Spans go over OTLP/HTTP with
//! protobuf bodies; gRPC and JSON bodies are refused with a clear error rather than ignored.

use anyhow::{Context as _, bail};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// The OTLP/HTTP endpoint when tracing is on and none is named (the collector's default).
pub const DEFAULT_ENDPOINT: &str = "http://localhost:4318";
/// How long one export may take before its spans are dropped (OTel's default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// `[tracing]` in `taskhost.toml`, as written.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingSection {
    /// Turns tracing on with the default endpoint (or off: `false` wins over an endpoint).
    pub enabled: Option<bool>,
    /// The collector's base URL, `/v1/traces` appended (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub endpoint: Option<String>,
    /// The full URL spans are posted to (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
    pub traces_endpoint: Option<String>,
    /// Headers sent with every export, e.g. an API key (`OTEL_EXPORTER_OTLP_HEADERS`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Milliseconds one export may take (`OTEL_EXPORTER_OTLP_TIMEOUT`).
    pub timeout_ms: Option<u64>,
    /// `service.name` (`OTEL_SERVICE_NAME`) [default: taskhost].
    pub service_name: Option<String>,
    /// More resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
    #[serde(default)]
    pub resource_attributes: BTreeMap<String, String>,
    /// `always_on`, `always_off`, `traceidratio`, `parentbased_always_on` (the default),
    /// `parentbased_always_off`, `parentbased_traceidratio` (`OTEL_TRACES_SAMPLER`).
    pub sampler: Option<String>,
    /// The ratio of the `traceidratio` samplers, 0 to 1 (`OTEL_TRACES_SAMPLER_ARG`).
    pub sampler_arg: Option<f64>,
    /// Milliseconds a finished span waits for its batch (`OTEL_BSP_SCHEDULE_DELAY`) [5000].
    pub schedule_delay_ms: Option<u64>,
    /// Spans waiting for export before new ones are dropped (`OTEL_BSP_MAX_QUEUE_SIZE`) [2048].
    pub max_queue_size: Option<usize>,
    /// Spans per export at most (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`) [512].
    pub max_export_batch_size: Option<usize>,
}

/// How finished spans are batched for export (OpenTelemetry's batch span processor settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub delay: Duration,
    pub queue: usize,
    pub batch: usize,
}

/// Which traces are recorded: a trace a producer started keeps its producer's decision
/// (parent-based) unless the operator says otherwise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
    ParentBased(Root),
}

/// What a parent-based sampler does with a trace that starts here.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

/// Where and how a worker exports its spans, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// The URL spans are posted to.
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub service_name: String,
    /// `OTEL_RESOURCE_ATTRIBUTES` over the file's, `service.name` apart.
    pub resource: Vec<(String, String)>,
    pub sampling: Sampling,
    pub batching: Batching,
}

impl TracingConfig {
    /// Resolves the variables `env` reads over `section`: none when tracing is off.
    ///
    /// # Errors
    /// A setting that is present and wrong, named as the operator wrote it.
    pub fn resolve(
        section: &TracingSection,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        let var = |name: &str| {
            env(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let exporter = var("OTEL_TRACES_EXPORTER");
        match exporter.as_deref() {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => bail!(
                "OTEL_TRACES_EXPORTER={other:?}: taskhost exports traces over OTLP only \
                 (\"otlp\", or \"none\" for no tracing)"
            ),
        }
        let traces_endpoint =
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| section.traces_endpoint.clone());
        let base = var("OTEL_EXPORTER_OTLP_ENDPOINT").or_else(|| section.endpoint.clone());
        let on = match section.enabled {
            Some(false) => exporter.is_some(),
            Some(true) => true,
            None => exporter.is_some() || traces_endpoint.is_some() || base.is_some(),
        };
        if !on {
            return Ok(None);
        }
        wire(&var)?;
        let endpoint = match (traces_endpoint, base) {
            (Some(full), _) => full,
            (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
            (None, None) => format!("{DEFAULT_ENDPOINT}/v1/traces"),
        };
        check_endpoint(&endpoint)?;
        let mut headers: BTreeMap<String, String> = section.headers.clone();
        for var_name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(list) = var(var_name) {
                headers.extend(pairs(&list, var_name)?);
            }
        }
        let timeout = match var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_TIMEOUT"))
        {
            Some(ms) => Some(ms.parse::<u64>().with_context(|| {
                format!("OTEL_EXPORTER_OTLP_TIMEOUT {ms:?} is not a number of milliseconds")
            })?),
            None => section.timeout_ms,
        };
        let timeout = match timeout {
            Some(0) => bail!("the OTLP export timeout must be at least 1 ms"),
            Some(ms) => Duration::from_millis(ms),
            None => DEFAULT_TIMEOUT,
        };
        let mut resource: BTreeMap<String, String> = section.resource_attributes.clone();
        if let Some(list) = var("OTEL_RESOURCE_ATTRIBUTES") {
            resource.extend(pairs(&list, "OTEL_RESOURCE_ATTRIBUTES")?);
        }
        let service_name = var("OTEL_SERVICE_NAME")
            .or_else(|| section.service_name.clone())
            .or_else(|| resource.get("service.name").cloned())
            .unwrap_or_else(|| "taskhost".to_owned());
        resource.remove("service.name");
        Ok(Some(Self {
            endpoint,
            headers: headers.into_iter().collect(),
            timeout,
            service_name,
            resource: resource.into_iter().collect(),
            sampling: sampling(section, &var)?,
            batching: batching(section, &var)?,
        }))
    }
}

/// Refuses the protocols and compressions this build does not speak, naming the ones it does.
fn wire(var: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    only(
        var,
        [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ],
        "http/protobuf",
        "taskhost sends OTLP over HTTP with protobuf bodies \
         (\"http/protobuf\", the collector's port 4318)",
    )?;
    only(
        var,
        [
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ],
        "none",
        "taskhost sends OTLP bodies uncompressed (\"none\"); a collector takes them either way",
    )?;
    Ok(())
}

/// Refuses a value of the first of `names` that is set other than `only`, the one this build
/// speaks: `why` says what it does instead.
fn only(
    var: &dyn Fn(&str) -> Option<String>,
    names: [&str; 2],
    only: &str,
    why: &str,
) -> anyhow::Result<()> {
    match names.into_iter().find_map(|name| Some((name, var(name)?))) {
        Some((name, value)) if value != only => bail!("{name}={value:?}: {why}"),
        _ => Ok(()),
    }
}

fn check_endpoint(endpoint: &str) -> anyhow::Result<()> {
    let url = url::Url::parse(endpoint)
        .with_context(|| format!("the OTLP traces endpoint {endpoint:?} is not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        bail!("the OTLP traces endpoint {endpoint:?} must be an http:// or https:// URL");
    }
    Ok(())
}

/// `key=value,key=value`, values percent-decoded (the W3C baggage form the `OTEL_*` lists use).
fn pairs(list: &str, name: &str) -> anyhow::Result<Vec<(String, String)>> {
    list.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair
                .split_once('=')
                .filter(|(k, _)| !k.trim().is_empty())
                .with_context(|| format!("{name}: {pair:?} is not key=value"))?;
            let value = percent_encoding::percent_decode_str(value.trim())
                .decode_utf8()
                .with_context(|| format!("{name}: the value of {key:?} is not UTF-8"))?;
            Ok((key.trim().to_owned(), value.into_owned()))
        })
        .collect()
}

fn batching(
    section: &TracingSection,
    var: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Batching> {
    let number = |name: &str, file: Option<u64>, default: u64, max: u64| -> anyhow::Result<u64> {
        let n = match var(name) {
            Some(text) => text
                .parse::<u64>()
                .with_context(|| format!("{name} {text:?} is not a whole number"))?,
            None => file.unwrap_or(default),
        };
        if n == 0 || n > max {
            bail!("{name} must be between 1 and {max}, got {n}");
        }
        Ok(n)
    };
    let as_u64 = |n: Option<usize>| n.map(|n| n as u64);
    let delay = number(
        "OTEL_BSP_SCHEDULE_DELAY",
        section.schedule_delay_ms,
        5_000,
        3_600_000,
    )?;
    let queue = number(
        "OTEL_BSP_MAX_QUEUE_SIZE",
        as_u64(section.max_queue_size),
        2048,
        1_000_000,
    )?;
    let batch = number(
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        as_u64(section.max_export_batch_size),
        512,
        queue,
    )?;
    Ok(Batching {
        delay: Duration::from_millis(delay),
        queue: queue as usize,
        batch: batch as usize,
    })
}

fn sampling(
    section: &TracingSection,
    var: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Sampling> {
    let name = var("OTEL_TRACES_SAMPLER").or_else(|| section.sampler.clone());
    let arg = match var("OTEL_TRACES_SAMPLER_ARG") {
        Some(text) => Some(text.parse::<f64>().with_context(|| {
            format!("OTEL_TRACES_SAMPLER_ARG {text:?} is not a number between 0 and 1")
        })?),
        None => section.sampler_arg,
    };
    let ratio = || -> anyhow::Result<f64> {
        let ratio = arg.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&ratio) {
            bail!("the sampler's ratio must be between 0 and 1, got {ratio}");
        }
        Ok(ratio)
    };
    Ok(match name.as_deref().unwrap_or("parentbased_always_on") {
        "always_on" => Sampling::AlwaysOn,
        "always_off" => Sampling::AlwaysOff,
        "traceidratio" => Sampling::Ratio(ratio()?),
        "parentbased_always_on" => Sampling::ParentBased(Root::AlwaysOn),
        "parentbased_always_off" => Sampling::ParentBased(Root::AlwaysOff),
        "parentbased_traceidratio" => Sampling::ParentBased(Root::Ratio(ratio()?)),
        other => bail!(
            "unknown trace sampler {other:?} (always_on, always_off, traceidratio, \
             parentbased_always_on, parentbased_always_off, parentbased_traceidratio)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(
        section: &TracingSection,
        vars: &[(&str, &str)],
    ) -> anyhow::Result<Option<TracingConfig>> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        TracingConfig::resolve(section, &|name| vars.get(name).cloned())
    }

    #[test]
    fn tracing_is_off_unless_an_endpoint_or_the_file_turns_it_on() {
        assert_eq!(resolve(&TracingSection::default(), &[]).ok(), Some(None));
        let on = resolve(
            &TracingSection::default(),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")],
        )
        .ok()
        .flatten()
        .map(|c| c.endpoint);
        assert_eq!(on.as_deref(), Some("http://c:4318/v1/traces"));
        let file = TracingSection {
            enabled: Some(true),
            ..TracingSection::default()
        };
        let default = resolve(&file, &[]).ok().flatten().map(|c| c.endpoint);
        assert_eq!(default.as_deref(), Some("http://localhost:4318/v1/traces"));
    }

    #[test]
    fn the_sdk_disabled_variable_wins_over_everything() {
        let file = TracingSection {
            enabled: Some(true),
            endpoint: Some("http://c:4318".into()),
            ..TracingSection::default()
        };
        assert_eq!(
            resolve(&file, &[("OTEL_SDK_DISABLED", "true")]).ok(),
            Some(None)
        );
        assert_eq!(
            resolve(&file, &[("OTEL_TRACES_EXPORTER", "none")]).ok(),
            Some(None)
        );
    }

    #[test]
    fn variables_win_over_the_file() {
        let file = TracingSection {
            endpoint: Some("http://file:4318".into()),
            service_name: Some("from-file".into()),
            headers: [("a".to_owned(), "file".to_owned())].into(),
            sampler: Some("always_off".into()),
            ..TracingSection::default()
        };
        let config = resolve(
            &file,
            &[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://env/x"),
                ("OTEL_SERVICE_NAME", "from-env"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "a=env%20key,b=2"),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
                ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod"),
            ],
        )
        .ok()
        .flatten()
        .expect("on");
        assert_eq!(config.endpoint, "https://env/x");
        assert_eq!(config.service_name, "from-env");
        assert_eq!(
            config.headers,
            vec![("a".into(), "env key".into()), ("b".into(), "2".into())]
        );
        assert_eq!(config.sampling, Sampling::ParentBased(Root::Ratio(0.25)));
        assert_eq!(
            config.resource,
            vec![("deployment.environment".into(), "prod".into())]
        );
    }

    #[test]
    fn a_protocol_sampler_or_endpoint_this_build_cannot_honour_is_an_error() {
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")];
        for bad in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_TRACES_SAMPLER", "jaeger_remote"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
            ("OTEL_BSP_SCHEDULE_DELAY", "never"),
        ] {
            let mut vars = on.to_vec();
            vars.push(bad);
            if bad.0 == "OTEL_TRACES_SAMPLER_ARG" {
                vars.push(("OTEL_TRACES_SAMPLER", "traceidratio"));
            }
            assert!(
                resolve(&TracingSection::default(), &vars).is_err(),
                "{bad:?}"
            );
        }
        let bad_url = [("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://c/v1/traces")];
        assert!(resolve(&TracingSection::default(), &bad_url).is_err());
    }
}
