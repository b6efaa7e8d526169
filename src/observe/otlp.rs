//! Export of a hub's records as OpenTelemetry spans over OTLP (gRPC or HTTP/protobuf), to
//! Jaeger, Grafana Tempo, Arize Phoenix, Langfuse or any collector (feature `otlp`).
//!
//! Records become spans as they are pushed: a bounded queue feeds a background task that sends
//! batches, so export never blocks the optimisation; when the queue is full, records are
//! dropped and counted ([`OtlpStats::dropped`]). One hub is one trace; the parent links follow
//! the records (run → generation → evaluate → call).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status as OtStatus, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value as OtValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use opentelemetry_sdk::Resource;
use tokio::sync::{mpsc, oneshot};

use super::{Hub, Record, Status};
use crate::error::{Error, Result};
use crate::function::Json;

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (usually port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (usually port 4318, path `/v1/traces`).
    HttpProtobuf,
}

/// Where and how to export.
///
/// # Examples
/// ```
/// use hyperfunc::observe::OtlpConfig;
/// let jaeger = OtlpConfig::grpc("http://127.0.0.1:4317").service_name("xor-search");
/// let lf = OtlpConfig::langfuse("https://cloud.langfuse.com", "pk-lf-1", "sk-lf-1");
/// assert!(lf.endpoint.ends_with("/api/public/otel/v1/traces"));
/// assert!(lf.headers.iter().any(|(k, v)| k == "Authorization" && v.starts_with("Basic ")));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpConfig {
    /// Collector URL: `http://host:4317` for gRPC, the full `…/v1/traces` URL for HTTP.
    pub endpoint: String,
    /// Transport.
    pub protocol: OtlpProtocol,
    /// `service.name` of the resource.
    pub service_name: String,
    /// Further resource attributes.
    pub resource: Vec<(String, String)>,
    /// Headers (HTTP) or metadata (gRPC), e.g. an `Authorization`.
    pub headers: Vec<(String, String)>,
    /// Records waiting to be sent at most; more are dropped and counted.
    pub queue_capacity: usize,
    /// Spans per export request at most.
    pub batch_size: usize,
    /// A partial batch is sent after this long.
    pub flush_interval: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl OtlpConfig {
    fn new(endpoint: &str, protocol: OtlpProtocol) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            protocol,
            service_name: "hyperfunc".into(),
            resource: Vec::new(),
            headers: Vec::new(),
            queue_capacity: 8192,
            batch_size: 512,
            flush_interval: Duration::from_millis(500),
            timeout: Duration::from_secs(10),
        }
    }

    /// OTLP/gRPC to `endpoint` (Jaeger, Tempo, a collector: `http://127.0.0.1:4317`).
    pub fn grpc(endpoint: &str) -> Self {
        Self::new(endpoint, OtlpProtocol::Grpc)
    }

    /// OTLP/HTTP protobuf to the full traces URL (`http://127.0.0.1:4318/v1/traces`).
    pub fn http(traces_url: &str) -> Self {
        Self::new(traces_url, OtlpProtocol::HttpProtobuf)
    }

    /// Arize Phoenix at `base` (e.g. `http://127.0.0.1:6006`), spans routed to `project`.
    pub fn phoenix(base: &str, project: &str) -> Self {
        Self::http(&format!("{}/v1/traces", base.trim_end_matches('/')))
            .resource_attr("openinference.project.name", project)
    }

    /// Langfuse at `host` through its OTLP endpoint, with its Basic auth header.
    pub fn langfuse(host: &str, public_key: &str, secret_key: &str) -> Self {
        Self::http(&format!(
            "{}/api/public/otel/v1/traces",
            host.trim_end_matches('/')
        ))
        .header(
            "Authorization",
            &format!("Basic {}", base64(&format!("{public_key}:{secret_key}"))),
        )
    }

    /// Sets `service.name`.
    pub fn service_name(mut self, name: &str) -> Self {
        self.service_name = name.into();
        self
    }

    /// Sets a resource attribute (replacing an earlier value of the same key).
    pub fn resource_attr(mut self, key: &str, value: &str) -> Self {
        self.resource.retain(|(k, _)| k != key);
        self.resource.push((key.into(), value.into()));
        self
    }

    /// Adds a header (HTTP) or metadata entry (gRPC).
    pub fn header(mut self, key: &str, value: &str) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }
}

fn base64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Counters of an exporter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OtlpStats {
    /// Spans the collector accepted.
    pub exported: u64,
    /// Records dropped because the queue was full.
    pub dropped: u64,
    /// Spans in batches the collector refused or that could not be sent.
    pub failed: u64,
}

enum Msg {
    /// A record and its hub's trace id; it becomes a span on the sender task, off the hot path.
    Record(Box<Record>, u128),
    Flush(oneshot::Sender<()>),
}

#[derive(Default)]
struct Counters {
    exported: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A running exporter; attach it to hubs with [`OtlpExporter::attach`].
///
/// # Examples
/// ```no_run
/// # async fn demo(hub: hyperfunc::Hub) -> hyperfunc::Result<()> {
/// use hyperfunc::observe::{OtlpConfig, OtlpExporter};
/// let otlp = OtlpExporter::start(OtlpConfig::grpc("http://127.0.0.1:4317"))?; // Jaeger
/// otlp.attach(&hub);
/// // … optimise with Es::default().hub(hub.clone()) …
/// otlp.flush().await?;
/// # Ok(()) }
/// ```
pub struct OtlpExporter {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpExporter")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn otlp_err(e: impl std::fmt::Display) -> Error {
    Error::config("otlp", e.to_string())
}

impl OtlpExporter {
    /// Builds the OTLP client and starts the background sender. Call inside a Tokio runtime.
    pub fn start(cfg: OtlpConfig) -> Result<Self> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            otlp_err("OtlpExporter::start needs a Tokio runtime: call it from async code")
        })?;
        let _guard = handle.enter();
        let mut exporter = match cfg.protocol {
            OtlpProtocol::Grpc => {
                let mut headers = http::HeaderMap::new();
                for (k, v) in &cfg.headers {
                    let key = http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                        .map_err(|_| otlp_err(format!("`{k}` is not a valid header name")))?;
                    let val = http::HeaderValue::from_str(v)
                        .map_err(|_| otlp_err(format!("header `{k}` has an invalid value")))?;
                    headers.insert(key, val);
                }
                let md =
                    opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers);
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(&cfg.endpoint)
                    .with_timeout(cfg.timeout)
                    .with_metadata(md)
                    .build()
            }
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(&cfg.endpoint)
                .with_timeout(cfg.timeout)
                .with_headers(cfg.headers.iter().cloned().collect::<HashMap<_, _>>())
                .build(),
        }
        .map_err(|e| {
            otlp_err(format!(
                "cannot build the exporter for {}: {e}",
                cfg.endpoint
            ))
        })?;
        let resource = Resource::builder_empty()
            .with_service_name(cfg.service_name.clone())
            .with_attributes(
                cfg.resource
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .build();
        exporter.set_resource(&resource);
        let (tx, mut rx) = mpsc::channel::<Msg>(cfg.queue_capacity.max(1));
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let (batch_size, every) = (cfg.batch_size.max(1), cfg.flush_interval);
        let scope = InstrumentationScope::builder("hyperfunc")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        handle.spawn(async move {
            let mut batch: Vec<SpanData> = Vec::new();
            let send = |batch: Vec<SpanData>| {
                let (c, n) = (c.clone(), batch.len() as u64);
                let fut = exporter.export(batch);
                async move {
                    match fut.await {
                        Ok(()) => {
                            c.exported.fetch_add(n, Relaxed);
                        }
                        Err(e) => {
                            c.failed.fetch_add(n, Relaxed);
                            *c.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(e.to_string());
                        }
                    }
                }
            };
            loop {
                let msg = match tokio::time::timeout(every, rx.recv()).await {
                    Ok(Some(m)) => Some(m),
                    Ok(None) => break,
                    Err(_) => None, // interval passed: send what is waiting
                };
                match msg {
                    Some(Msg::Record(r, trace)) => {
                        batch.push(to_span(&r, trace, &scope));
                        if batch.len() < batch_size {
                            continue;
                        }
                    }
                    Some(Msg::Flush(done)) => {
                        if !batch.is_empty() {
                            send(std::mem::take(&mut batch)).await;
                        }
                        let _ = done.send(());
                        continue;
                    }
                    None => {}
                }
                if !batch.is_empty() {
                    send(std::mem::take(&mut batch)).await;
                }
            }
            if !batch.is_empty() {
                send(batch).await;
            }
        });
        Ok(Self { tx, counters })
    }

    /// Exports every record `hub` receives from now on.
    pub fn attach(&self, hub: &Hub) {
        let (tx, counters, trace) = (self.tx.clone(), self.counters.clone(), hub.trace_id_u128());
        hub.add_sink(Arc::new(move |r: &Record| {
            if tx
                .try_send(Msg::Record(Box::new(r.clone()), trace))
                .is_err()
            {
                counters.dropped.fetch_add(1, Relaxed);
            }
        }));
    }

    /// Sends everything queued so far and waits until the collector answered.
    pub async fn flush(&self) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Flush(done))
            .await
            .map_err(|_| otlp_err("the export task has stopped"))?;
        wait.await
            .map_err(|_| otlp_err("the export task has stopped"))?;
        match self.last_error() {
            Some(e) if self.stats().failed > 0 => Err(otlp_err(format!(
                "{} span(s) were not accepted; last error: {e}",
                self.stats().failed
            ))),
            _ => Ok(()),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> OtlpStats {
        OtlpStats {
            exported: self.counters.exported.load(Relaxed),
            dropped: self.counters.dropped.load(Relaxed),
            failed: self.counters.failed.load(Relaxed),
        }
    }

    /// The last export error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.counters
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn ot_value(v: &Json) -> OtValue {
    match v {
        Json::Bool(b) => OtValue::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => OtValue::I64(i),
            (None, Some(f)) if n.is_u64() => OtValue::I64(f as i64),
            (None, Some(f)) => OtValue::F64(f),
            _ => OtValue::String(n.to_string().into()),
        },
        Json::String(s) => OtValue::String(s.clone().into()),
        Json::Array(items) if items.iter().all(Json::is_string) => OtValue::Array(Array::String(
            items
                .iter()
                .filter_map(|i| i.as_str().map(|s| StringValue::from(s.to_string())))
                .collect(),
        )),
        other => OtValue::String(other.to_string().into()),
    }
}

/// A span id unique across traces (backends such as Phoenix index span ids globally): a
/// bijective mix of the record id with the trace id, so distinct records of a hub get distinct
/// ids (the one id that mixes to 0 becomes 1, a 2⁻⁶⁴ chance of a clash).
fn span_id(id: u64, trace: u128) -> SpanId {
    let mut z = id ^ (trace as u64);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    SpanId::from_bytes(z.max(1).to_be_bytes())
}

fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// One record as an OpenTelemetry span of trace `trace`.
pub(crate) fn to_span(r: &Record, trace: u128, scope: &InstrumentationScope) -> SpanData {
    let attr = |k: &str| r.attribute(k).and_then(Json::as_str);
    let (name, kind): (Cow<'static, str>, SpanKind) =
        match (attr("gen_ai.operation.name"), attr("gen_ai.request.model")) {
            (Some(op), Some(model)) => (format!("{op} {model}").into(), SpanKind::Client),
            _ => (r.name.to_string().into(), SpanKind::Internal),
        };
    let mut attributes: Vec<KeyValue> = r
        .attributes
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), ot_value(v)))
        .collect();
    attributes.push(KeyValue::new("hyperfunc.function", r.name.to_string()));
    if let Ok(OtValue::String(kind)) = serde_json::to_value(r.kind).map(|v| ot_value(&v)) {
        attributes.push(KeyValue::new("hyperfunc.kind", kind));
    }
    if let Some(g) = r.generation {
        attributes.push(KeyValue::new("hyperfunc.generation", g as i64));
    }
    if let Some((a, b)) = r.candidates {
        attributes.push(KeyValue::new("hyperfunc.candidates", format!("{a}..{b}")));
    }
    if let Some((a, b)) = r.examples {
        attributes.push(KeyValue::new("hyperfunc.examples", format!("{a}..{b}")));
    }
    if let Some((file, line)) = r.call_site.as_deref().and_then(|s| s.rsplit_once(':')) {
        attributes.push(KeyValue::new("code.file.path", file.to_string()));
        if let Ok(l) = line.parse::<i64>() {
            attributes.push(KeyValue::new("code.line.number", l));
        }
    }
    let mut events = SpanEvents::default();
    let status = match r.status {
        Status::Ok => OtStatus::Ok,
        Status::Error => {
            let ty = r.error_type.clone().unwrap_or_else(|| "error".into());
            let msg = r.error_message.clone().unwrap_or_default();
            if r.attribute("error.type").is_none() {
                attributes.push(KeyValue::new("error.type", ty.clone()));
            }
            events.events.push(Event::new(
                "exception",
                time(r.end_unix_ns),
                vec![
                    KeyValue::new("exception.type", ty),
                    KeyValue::new("exception.message", msg.clone()),
                ],
                0,
            ));
            OtStatus::error(msg)
        }
    };
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(trace.to_be_bytes()),
            span_id(r.id, trace),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: r.parent.map_or(SpanId::INVALID, |p| span_id(p, trace)),
        parent_span_is_remote: false,
        span_kind: kind,
        name,
        start_time: time(r.start_unix_ns),
        end_time: time(r.end_unix_ns.max(r.start_unix_ns)),
        attributes,
        dropped_attributes_count: 0,
        events,
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(""), "");
        assert_eq!(base64("f"), "Zg==");
        assert_eq!(base64("fo"), "Zm8=");
        assert_eq!(base64("foo"), "Zm9v");
        assert_eq!(base64("pk-lf-1:sk-lf-1"), "cGstbGYtMTpzay1sZi0x");
    }
}
