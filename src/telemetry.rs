//! Logging: `tracing` to stdout, text by default (`--log-format json` for JSON), level from `RUST_LOG`
//! (default `info,kube=warn`).
//!
//! Text lines begin with the message itself, so a line about a cluster begins `<cluster-name>: ` and
//! `kubectl logs ... | grep ^example-cluster2:` finds exactly that cluster's lines; the level and time
//! follow at the end of the line.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Output format of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

struct MessageFirst;

impl<S, N> FormatEvent<S, N> for MessageFirst
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        let meta = event.metadata();
        let now = k8s_openapi::jiff::Timestamp::now();
        let target = meta.target();
        // Library lines (kube, leader election) keep their origin visible.
        if !target.starts_with("ray_operator") {
            write!(writer, "  [{target}]")?;
        }
        writeln!(
            writer,
            "  level={} ts={}",
            meta.level().as_str().to_ascii_lowercase(),
            now.strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
        )
    }
}

/// Installs the global subscriber (once; later calls are ignored) and bridges the `log` crate
/// (for dependencies that log through it).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    // try_init also installs the `log` → `tracing` bridge (tracing-subscriber's tracing-log feature).
    let _ = match format {
        LogFormat::Text => builder.event_format(MessageFirst).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}
