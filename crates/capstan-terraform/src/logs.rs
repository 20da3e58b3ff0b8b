//! A plugin's log lines: hclog JSON or plain, with their level, from stderr or `GRPCStdio`.

/// Where a plugin's output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// Its stderr (Terraform providers log there, in hclog's JSON or in plain lines).
    Stderr,
    /// go-plugin's `GRPCStdio` stream: what the plugin's own code wrote to stdout or stderr.
    StdioOut,
    StdioErr,
}

/// One line a plugin wrote, read as a log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub channel: Channel,
    /// `trace`, `debug`, `info`, `warn` or `error`, when the line says (hclog's JSON
    /// `@level`, or a `[DEBUG]`-style prefix).
    pub level: Option<&'static str>,
    /// The message (hclog's `@message`, or the whole line).
    pub message: String,
    /// The resource type it is about, when the line says (`tf_resource_type`).
    pub resource_type: Option<String>,
}

impl LogLine {
    /// Reads one line of a plugin's output.
    pub fn parse(channel: Channel, line: &str) -> LogLine {
        let line = line.trim_end();
        if let Ok(serde_json::Value::Object(o)) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(message) = o.get("@message").and_then(|m| m.as_str()) {
                return LogLine {
                    channel,
                    level: o.get("@level").and_then(|l| l.as_str()).and_then(level),
                    message: message.to_string(),
                    resource_type: o
                        .get("tf_resource_type")
                        .and_then(|t| t.as_str())
                        .map(str::to_string),
                };
            }
        }
        let bracketed = line.find('[').and_then(|start| {
            let end = start + line[start..].find(']')?;
            level(&line[start + 1..end])
        });
        LogLine {
            channel,
            level: bracketed,
            message: line.to_string(),
            resource_type: None,
        }
    }
}

pub(crate) fn level(name: &str) -> Option<&'static str> {
    Some(match name.to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        "error" => "error",
        _ => return None,
    })
}

/// Where a plugin's log lines go (called from the tasks that read them).
pub type LogSink = std::sync::Arc<dyn Fn(LogLine) + Send + Sync>;
