//! The info string: `["<protocol class>", <serializer spec>, "<route>"]`
//! (a JSON array of client class, serializer and route directory), produced
//! and parsed.

use std::fmt;

use crate::error::{Error, Result};
use crate::serializer::{Serializer, expand_class};

/// The protocol class ipcm speaks.
pub const PROTOCOL_CLASS: &str = "IPC::Manager::Client::ConnectionUnix";

/// Class-name prefix of protocols in the info string.
pub const PROTOCOL_PREFIX: &str = "IPC::Manager::Client::";

/// A parsed info string: which serializer, which route directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The route's serializer.
    pub serializer: Serializer,
    /// The route directory, exactly as given (never canonicalised: the name
    /// budget depends on its length).
    pub route: String,
}

impl Info {
    /// An info string for `route` with `serializer`.
    pub fn new(serializer: Serializer, route: impl Into<String>) -> Self {
        Info {
            serializer,
            route: route.into(),
        }
    }

    /// Parses an info string.
    pub fn parse(text: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(text.trim()).map_err(|e| Error::InfoString(e.to_string()))?;
        let serde_json::Value::Array(items) = v else {
            return Err(Error::InfoString("expected a JSON array".into()));
        };
        let [proto, ser, route] = items.as_slice() else {
            return Err(Error::InfoString(format!(
                "expected 3 elements (protocol, serializer, route), got {}",
                items.len()
            )));
        };
        let Some(proto) = proto.as_str() else {
            return Err(Error::InfoString("protocol must be a string".into()));
        };
        let proto = expand_class(proto, PROTOCOL_PREFIX);
        if proto != PROTOCOL_CLASS {
            return Err(Error::UnsupportedProtocol(proto));
        }
        if ser.is_null() || ser.as_str() == Some("") {
            return Err(Error::SerializerRequired);
        }
        let serializer = Serializer::from_spec(ser)?;
        let route = match route {
            serde_json::Value::String(r) if !r.is_empty() => r,
            serde_json::Value::Null => return Err(Error::RouteRequired),
            serde_json::Value::String(_) => return Err(Error::RouteRequired),
            _ => return Err(Error::InfoString("route must be a string".into())),
        };
        Ok(Info::new(serializer, route))
    }

    /// The compact JSON text (`/` not escaped, ASCII-only).
    pub fn to_info_string(&self) -> String {
        let v = serde_json::json!([PROTOCOL_CLASS, self.serializer.spec(), self.route]);
        let mut out = bytes::BytesMut::new();
        // Serializing a Value into memory cannot fail.
        let _ = crate::serializer::json::to_ascii_json(&v, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl fmt::Display for Info {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_info_string())
    }
}

impl std::str::FromStr for Info {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Info::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let i = Info::new(Serializer::Json, "/tmp/PerlIPCManager-4242-Ab12Cd");
        let s = i.to_info_string();
        assert_eq!(
            s,
            r#"["IPC::Manager::Client::ConnectionUnix","IPC::Manager::Serializer::JSON","/tmp/PerlIPCManager-4242-Ab12Cd"]"#
        );
        assert_eq!(Info::parse(&s).unwrap(), i);
    }

    #[test]
    fn short_class_names_are_expanded() {
        let i = Info::parse(r#"["ConnectionUnix","JSON","/r"]"#).unwrap();
        assert_eq!(i.route, "/r");
        let i = Info::parse(r#"["+IPC::Manager::Client::ConnectionUnix",["JSON"],"/r/"]"#).unwrap();
        assert_eq!(i.route, "/r/", "route kept verbatim");
    }

    #[test]
    fn bad_info_strings_are_clear_errors() {
        assert!(matches!(
            Info::parse(r#"["LocalMemory","JSON","/r"]"#),
            Err(Error::UnsupportedProtocol(p)) if p == "IPC::Manager::Client::LocalMemory"
        ));
        assert!(Info::parse("{}").is_err());
        assert!(Info::parse(r#"["ConnectionUnix","JSON"]"#).is_err());
        assert_eq!(
            Info::parse(r#"["ConnectionUnix","JSON",""]"#)
                .unwrap_err()
                .to_string(),
            "'route' is a required attribute"
        );
        assert_eq!(
            Info::parse(r#"["ConnectionUnix",null,"/r"]"#)
                .unwrap_err()
                .to_string(),
            "'serializer' is a required attribute"
        );
    }
}
