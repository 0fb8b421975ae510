//! Tracing to stderr and to the server's own log file, and the span timings of
//! [`crate::timings`].

use std::path::Path;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global subscriber. Keep the returned guard alive: it flushes the file writer.
/// The filter comes from `RUST_LOG` (default `info`, with chatty dependencies at `warn`).
pub fn init(name: &str, log_file: Option<&Path>) -> anyhow::Result<Option<WorkerGuard>> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn,hyper=warn,reqwest=warn,h2=warn"));
    // Colour only on a terminal: `docker logs` and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stderr = fmt::layer().with_writer(std::io::stderr).with_target(false).with_ansi(ansi);
    let (file_layer, guard) = match log_file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            let (writer, guard) = tracing_appender::non_blocking(file);
            (Some(fmt::layer().with_writer(writer).with_ansi(false).with_target(false)), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(crate::timings::Timings)
        .with(stderr)
        .with(file_layer)
        .try_init()?;
    // Panics (ours or a library's task) go to the log file too, not only to stderr.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(panic = %info, "panicked");
        default_hook(info);
    }));
    tracing::info!(server = name, pid = std::process::id(), "starting");
    Ok(guard)
}
