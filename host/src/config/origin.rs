//! An HTTP origin (`scheme://host:port`): what a plugin is granted to reach, and what each
//! of its requests is checked against.

/// An HTTP origin a plugin may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: String,
    pub host: String,
    pub port: u16,
}

/// Why a URL has no origin a plugin could be granted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OriginError {
    #[error("{0}")]
    Uri(String),
    #[error("no scheme")]
    NoScheme,
    #[error("scheme {0:?} is not http or https")]
    Scheme(String),
    #[error("no host")]
    NoHost,
}

impl Origin {
    /// Parses the origin of a URL; a path and query are ignored.
    pub fn parse(url: &str) -> Result<Self, OriginError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| OriginError::Uri(e.to_string()))?;
        Self::of(&uri)
    }

    /// The origin of a request URI.
    pub fn of(uri: &http::Uri) -> Result<Self, OriginError> {
        let scheme = uri
            .scheme_str()
            .ok_or(OriginError::NoScheme)?
            .to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err(OriginError::Scheme(scheme)),
        };
        let host = uri.host().ok_or(OriginError::NoHost)?.to_ascii_lowercase();
        Ok(Self {
            port: uri.port_u16().unwrap_or(default_port),
            scheme,
            host,
        })
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}
