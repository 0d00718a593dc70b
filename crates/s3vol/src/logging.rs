//! Logging setup shared by every subcommand: `tracing` to stderr, human-readable by default,
//! JSON lines with `--log-format json` (what log collectors in a cluster want).

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. `level` is a `tracing` filter (`info`, `debug`,
/// `s3vol_fs=trace,info`); `RUST_LOG`, when set, wins.
pub fn init(level: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => EnvFilter::try_new(env)?,
        // A plain level also quiets the SDK's credential-chain chatter (one warning per
        // provider tried); a detailed filter is taken as given.
        _ if is_plain_level(level) => EnvFilter::try_new(format!("{level},aws_config=error"))?,
        _ => EnvFilter::try_new(level)
            .map_err(|e| anyhow::anyhow!("invalid --log-level {level:?}: {e}"))?,
    };
    // Colours only on a terminal: log collectors and the mounter's forwarded lines want text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        // A log line that cannot be written is dropped. Reporting it would `eprintln!`, which
        // panics when stderr is gone — as it is for a CSI serving process whose mounter died —
        // and the panic would kill whatever task was logging (its SIGTERM handler, say).
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|e| anyhow::anyhow!("logging: {e}"))
}

fn is_plain_level(level: &str) -> bool {
    matches!(
        level.to_ascii_lowercase().as_str(),
        "error" | "warn" | "info" | "debug" | "trace" | "off"
    )
}
