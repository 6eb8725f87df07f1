//! Field types that validate while they deserialize, so a bad value is reported with the
//! line and the field path of where it was written ("parse, don't validate").

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ambit_core::identity::{is_dns1123_label, is_dns1123_subdomain};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident, $check:expr, $what:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                let check: fn(&str) -> bool = $check;
                if check(&s) {
                    Ok(Self(s))
                } else {
                    Err(format!("{s:?} is not {}", $what))
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::try_from(s).map_err(de::Error::custom)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// An object name: a DNS-1123 subdomain (lowercase alphanumerics, `-` and `.`, at
    /// most 253 characters).
    Name,
    is_dns1123_subdomain,
    "a valid name (a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', at most 253 characters)"
);

string_newtype!(
    /// A namespace name: a DNS-1123 label (lowercase alphanumerics and `-`, at most 63).
    NamespaceName,
    is_dns1123_label,
    "a valid namespace name (a DNS-1123 label: lowercase letters, digits and '-', at most 63 characters)"
);

string_newtype!(
    /// A Kubernetes node name (DNS-1123 subdomain).
    NodeName,
    is_dns1123_subdomain,
    "a valid node name (a DNS-1123 subdomain)"
);

impl NamespaceName {
    /// The namespace objects land in when their manifest names none.
    pub fn default_namespace() -> Self {
        Self("default".to_owned())
    }
}

/// Kubernetes label map with validated keys and values.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether every label of `selector` is present here with the same value.
    pub fn matches(&self, selector: &Labels) -> bool {
        selector.0.iter().all(|(k, v)| self.0.get(k) == Some(v))
    }

    pub fn insert(&mut self, key: &str, value: &str) -> Result<(), String> {
        check_label_key(key)?;
        check_label_value(value)?;
        self.0.insert(key.to_owned(), value.to_owned());
        Ok(())
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<'a> FromIterator<(&'a str, &'a str)> for Labels {
    /// Builds a label map from pairs known to be valid (tests and generated objects).
    fn from_iter<T: IntoIterator<Item = (&'a str, &'a str)>>(iter: T) -> Self {
        Self(
            iter.into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !is_dns1123_subdomain(p)
    {
        return Err(format!(
            "label key {key:?}: the prefix must be a DNS-1123 subdomain"
        ));
    }
    if !is_label_name(name) {
        return Err(format!(
            "label key {key:?}: the name must be 1-63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} must be empty or 1-63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of label keys to string values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    check_label_key(&key).map_err(de::Error::custom)?;
                    let value: ScalarString = map.next_value()?;
                    check_label_value(&value.0).map_err(de::Error::custom)?;
                    out.insert(key, value.0);
                }
                Ok(Labels(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A string that may be written as a YAML string, number or boolean (`version: 1`), kept
/// as written: label values and annotation values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalarString(pub String);

impl<'de> Deserialize<'de> for ScalarString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ScalarString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<ScalarString, E> {
                Ok(ScalarString(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ScalarString, E> {
                Ok(ScalarString(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Annotations: free-form string values.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Annotations(BTreeMap<String, String>);

impl Annotations {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

impl fmt::Debug for Annotations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<'de> Deserialize<'de> for Annotations {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, ScalarString>::deserialize(d)?;
        Ok(Self(raw.into_iter().map(|(k, v)| (k, v.0)).collect()))
    }
}

/// A TCP/UDP port, 1 to 65535, written as a number or a string of digits (Istio's
/// policy fields write ports as strings).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Port(pub u16);

impl fmt::Debug for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Port {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().parse::<u32>() {
            Ok(n) => Self::from_number(n.into()),
            Err(_) => Err(format!("{s:?} is not a port number")),
        }
    }
}

impl Port {
    fn from_number(n: u64) -> Result<Self, String> {
        match u16::try_from(n) {
            Ok(p) if p > 0 => Ok(Port(p)),
            _ => Err(format!("port {n} is out of range (1-65535)")),
        }
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (1-65535)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                Port::from_number(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("port {v} is out of range (1-65535)")))
                    .and_then(|v| Port::from_number(v).map_err(E::custom))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Port, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A Service `targetPort`: a number, or the name of a container port.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(Port),
    String(String),
}

impl fmt::Debug for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrString::Int(p) => write!(f, "{p:?}"),
            IntOrString::String(s) => write!(f, "{s:?}"),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a port name")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                Port::from_number(v)
                    .map(IntOrString::Int)
                    .map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Err(E::custom(format!("port {v} is out of range (1-65535)")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                if let Ok(p) = v.parse::<Port>() {
                    return Ok(IntOrString::Int(p));
                }
                if is_port_name(v) {
                    Ok(IntOrString::String(v.to_owned()))
                } else {
                    Err(E::custom(format!(
                        "{v:?} is neither a port number nor a valid port name (at most 15 lowercase letters, digits and '-')"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// An IANA service name, as Kubernetes port names are: 1-15 characters of lowercase
/// letters, digits and `-`, with at least one letter.
fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// An IP address or CIDR block, as policy `ipBlocks` and ServiceEntry `addresses` are
/// written.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "String")]
pub struct IpBlock {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpBlock {
    /// Whether `ip` is in the block (the node proxy's own CIDR matching, so both sides
    /// agree by construction).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ambit_core::policy::IpNet {
            addr: self.addr,
            prefix: self.prefix,
        }
        .contains(ip)
    }
}

impl FromStr for IpBlock {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IP address or CIDR block");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a.parse::<IpAddr>().map_err(|_| bad())?,
                Some(p.parse::<u8>().map_err(|_| bad())?),
            ),
            None => (s.parse::<IpAddr>().map_err(|_| bad())?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(format!(
                "{s:?}: prefix length {prefix} is longer than {max}"
            ));
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Debug for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<IpBlock> for String {
    fn from(b: IpBlock) -> String {
        b.to_string()
    }
}

impl<'de> Deserialize<'de> for IpBlock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// A non-empty string (names that must be present).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct NonEmpty(String);

impl NonEmpty {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NonEmpty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            Err(de::Error::custom("must not be empty"))
        } else {
            Ok(Self(s))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_blocks() {
        let b: IpBlock = "198.18.0.0/15".parse().unwrap();
        assert!(b.contains("198.19.255.1".parse().unwrap()));
        assert!(!b.contains("198.20.0.1".parse().unwrap()));
        assert!(!b.contains("::1".parse().unwrap()));
        let one: IpBlock = "10.0.0.1".parse().unwrap();
        assert_eq!(one.prefix, 32);
        assert!(one.contains("10.0.0.1".parse().unwrap()));
        assert!(!one.contains("10.0.0.2".parse().unwrap()));
        let all: IpBlock = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6: IpBlock = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpBlock>().is_err());
        assert!("10.0.0/8".parse::<IpBlock>().is_err());
        assert!("x".parse::<IpBlock>().is_err());
    }

    #[test]
    fn ports() {
        assert_eq!("80".parse::<Port>(), Ok(Port(80)));
        assert!("0".parse::<Port>().is_err());
        assert!("65536".parse::<Port>().is_err());
        assert!("http".parse::<Port>().is_err());
    }

    #[test]
    fn label_rules() {
        assert!(check_label_key("app").is_ok());
        assert!(check_label_key("istio.io/dataplane-mode").is_ok());
        assert!(check_label_key("app.kubernetes.io/name").is_ok());
        assert!(check_label_key("Bad_Prefix/x").is_err());
        assert!(check_label_key("-x").is_err());
        assert!(check_label_key("").is_err());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("v1.2_3-a").is_ok());
        assert!(check_label_value("has space").is_err());
        assert!(check_label_value(&"a".repeat(64)).is_err());
    }

    #[test]
    fn port_names() {
        assert!(is_port_name("http"));
        assert!(is_port_name("http-2"));
        assert!(!is_port_name("123"));
        assert!(!is_port_name("a--b"));
        assert!(!is_port_name("this-name-is-too-long"));
    }
}
