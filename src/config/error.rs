//! [`ConfigError`]: what is wrong with a configuration file, and where.

use std::fmt;

/// An invalid configuration: the file, the key path (`route[0].timeout_ms`), the
/// problem and, when known, the line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    file: String,
    key: Option<String>,
    message: String,
    position: Option<(usize, usize)>,
}

impl ConfigError {
    pub(super) fn new(file: &str, key: String, message: String) -> Self {
        Self {
            file: file.into(),
            key: Some(key),
            message,
            position: None,
        }
    }

    pub(super) fn io(file: &str, err: &std::io::Error) -> Self {
        Self {
            file: file.into(),
            key: None,
            message: format!("cannot read the file: {err}"),
            position: None,
        }
    }

    /// A TOML syntax error: no key yet, but a position.
    pub(super) fn toml(file: &str, text: &str, err: &toml::de::Error) -> Self {
        Self {
            file: file.into(),
            key: None,
            message: format!("TOML syntax error: {}", err.message().trim()),
            position: err.span().map(|s| line_col(text, s.start)),
        }
    }

    /// A value that did not deserialize: serde_path_to_error knows its key path.
    pub(super) fn field(
        file: &str,
        text: &str,
        err: &serde_path_to_error::Error<toml::de::Error>,
    ) -> Self {
        let inner = err.inner();
        let message = inner.message().trim().to_string();
        let mut key = err.path().to_string();
        // Some formats report an unknown key at its parent; name the key itself.
        if let Some(rest) = message.strip_prefix("unknown field `")
            && let Some((field, _)) = rest.split_once('`')
            && !(key == field || key.ends_with(&format!(".{field}")))
        {
            key = if key == "." {
                field.to_string()
            } else {
                format!("{key}.{field}")
            };
        }
        if key == "." {
            key = "(top level)".into();
        }
        Self {
            file: file.into(),
            key: Some(key),
            message,
            position: inner.span().map(|s| line_col(text, s.start)),
        }
    }

    /// The key path the error is about, if it is about one key.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The problem, without file and key.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}
