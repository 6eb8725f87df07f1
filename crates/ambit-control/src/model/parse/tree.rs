//! A document as a plain tree of YAML values that remember where they were written: used
//! to report every error of a document rather than the first, and to give checks that
//! run on the typed object (a policy rule that names nothing) the line of their field.
//!
//! Finding more errors works by elimination: the typed deserializer stops at the first
//! error; the field at fault is cut from the tree and the rest deserialized again, until
//! it passes or an error cannot be cut away (a missing field). Each error keeps the line
//! and the path of the field as written (sequence indices are the original ones, not the
//! ones left after a cut).

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Errors reported per document, at most (a file of garbage says enough by then).
pub const MAX_ERRORS: usize = 20;

/// A value and the place (1-based line and column, 0 when unknown) it was written in the
/// document.
#[derive(Debug, Clone)]
pub struct Node {
    pub value: Value,
    pub line: u64,
    pub column: u64,
}

#[derive(Debug, Clone)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(String),
    /// Elements with their index in the document.
    Seq(Vec<(usize, Node)>),
    Map(Vec<(String, Node)>),
}

/// Reads a document's tree, or nothing if it is not well-formed YAML (its syntax error is
/// reported on its own).
pub fn read(text: &str, options: serde_saphyr::Options) -> Option<Node> {
    let spanned: Spanned<Value> = serde_saphyr::from_str_with_options(text, options).ok()?;
    Some(from_spanned(spanned))
}

fn from_spanned(s: Spanned<Value>) -> Node {
    Node {
        value: s.value,
        line: s.referenced.line(),
        column: s.referenced.column(),
    }
}

impl<'de> de::Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Uint(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Value>>()? {
            items.push((items.len(), from_spanned(item)));
        }
        Ok(Value::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Key>()? {
            let value = map.next_value::<Spanned<Value>>()?;
            entries.push((key.0, from_spanned(value)));
        }
        Ok(Value::Map(entries))
    }
}

/// A mapping key as text (YAML allows numbers and booleans as keys).
struct Key(String);

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_owned()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<Key, E> {
                Ok(Key("null".to_owned()))
            }
        }
        deserializer.deserialize_any(KeyVisitor)
    }
}

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// Splits a dotted path as the errors print it (`spec.rules[0].from[1].source`).
pub fn steps(path: &str) -> Vec<Step> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            out.push(Step::Key(name.to_owned()));
        }
        while let Some(close) = rest.find(']') {
            if let Ok(i) = rest[1..close].parse() {
                out.push(Step::Index(i));
            }
            rest = &rest[close + 1..];
        }
    }
    out
}

/// Prints a path the way the errors do, with the document's own indices.
pub fn display(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

impl Node {
    /// The node at `path` (indices as they are in this, possibly cut, tree), and the same
    /// path with the document's original indices.
    fn find(&self, path: &[Step]) -> Option<(&Node, Vec<Step>)> {
        let mut node = self;
        let mut original = Vec::with_capacity(path.len());
        for step in path {
            node = match (step, &node.value) {
                (Step::Key(k), Value::Map(entries)) => {
                    original.push(step.clone());
                    &entries.iter().rev().find(|(key, _)| key == k)?.1
                }
                (Step::Index(i), Value::Seq(items)) => {
                    let (at, item) = items.get(*i)?;
                    original.push(Step::Index(*at));
                    item
                }
                _ => return None,
            };
        }
        Some((node, original))
    }

    /// The place of the deepest node along `path` that exists (original indices): where
    /// an error about that field is best shown.
    pub fn locate(&self, path: &[Step]) -> (u64, u64) {
        let mut node = self;
        for step in path {
            let next = match (step, &node.value) {
                (Step::Key(k), Value::Map(entries)) => {
                    entries.iter().rev().find(|(key, _)| key == k).map(|e| &e.1)
                }
                (Step::Index(i), Value::Seq(items)) => {
                    items.iter().find(|(at, _)| at == i).map(|e| &e.1)
                }
                _ => None,
            };
            match next {
                Some(n) if n.line > 0 => node = n,
                _ => break,
            }
        }
        (node.line, node.column)
    }

    /// Cuts the node at `path` (current indices) out of the tree.
    fn cut(&mut self, path: &[Step]) -> bool {
        let Some((last, parents)) = path.split_last() else {
            return false;
        };
        let mut node = self;
        for step in parents {
            node = match (step, &mut node.value) {
                (Step::Key(k), Value::Map(entries)) => {
                    match entries.iter_mut().rev().find(|(key, _)| key == k) {
                        Some(e) => &mut e.1,
                        None => return false,
                    }
                }
                (Step::Index(i), Value::Seq(items)) => match items.get_mut(*i) {
                    Some(e) => &mut e.1,
                    None => return false,
                },
                _ => return false,
            };
        }
        match (last, &mut node.value) {
            (Step::Key(k), Value::Map(entries)) => {
                let before = entries.len();
                entries.retain(|(key, _)| key != k);
                entries.len() < before
            }
            (Step::Index(i), Value::Seq(items)) if *i < items.len() => {
                items.remove(*i);
                true
            }
            _ => false,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match &self.value {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Uint(u) => J::from(*u),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Value::Str(s) => J::String(s.clone()),
            Value::Seq(items) => J::Array(items.iter().map(|(_, n)| n.to_json()).collect()),
            Value::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, n)| (k.clone(), n.to_json()))
                    .collect(),
            ),
        }
    }
}

/// An error found by elimination: where (in the document), which field, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub line: u64,
    pub column: u64,
    pub field: String,
    pub message: String,
}

/// The first error of deserializing `tree` into `T`: its path (current indices) and
/// message.
fn first_error<T: DeserializeOwned>(tree: &Node) -> Option<(Vec<Step>, String)> {
    match serde_path_to_error::deserialize::<_, T>(tree.to_json()) {
        Ok(_) => None,
        Err(e) => {
            let path = e
                .path()
                .iter()
                .filter_map(|s| match s {
                    serde_path_to_error::Segment::Map { key } => Some(Step::Key(key.clone())),
                    serde_path_to_error::Segment::Seq { index } => Some(Step::Index(*index)),
                    _ => None,
                })
                .collect();
            Some((path, e.into_inner().to_string()))
        }
    }
}

/// The errors of deserializing `tree` into `T` after the first one, which the caller
/// already has (found by the YAML deserializer at `first_field`). Empty when the tree
/// does not fail the same way first (the two deserializers disagree: only the first
/// error is trustworthy then) or has nothing more to say. The tree is left with every
/// faulty field cut, for checks that run on what remains.
pub fn more_errors<T: DeserializeOwned>(tree: &mut Node, first_field: &str) -> Vec<Found> {
    let mut found = Vec::new();
    let Some((path, message)) = first_error::<T>(tree) else {
        return found;
    };
    let mut original = match tree.find(&path) {
        Some((_, original)) => original,
        None => return found,
    };
    if display(&original) != first_field || !can_cut(&message) || !tree.cut(&path) {
        return found;
    }
    let mut cut = vec![original.clone()];
    while found.len() + 1 < MAX_ERRORS {
        let Some((path, message)) = first_error::<T>(tree) else {
            break;
        };
        // A required field cut for its error is missing now: that is no news, and the
        // object cannot be deserialized further.
        if let Some(name) = missing_field(&message)
            && let Some((_, mut o)) = tree.find(&path)
        {
            o.push(Step::Key(name.to_owned()));
            if cut.contains(&o) {
                break;
            }
        }
        // Missing fields and errors about the document as a whole name the place of the
        // nearest existing field.
        let (line, column, field) = match tree.find(&path) {
            Some((node, o)) => {
                original = o;
                (node.line, node.column, display(&original))
            }
            None => {
                let (line, column) = tree
                    .find(&path[..path.len().saturating_sub(1)])
                    .map(|(n, _)| (n.line, n.column))
                    .unwrap_or((tree.line, tree.column));
                (line, column, display(&path))
            }
        };
        found.push(Found {
            line,
            column,
            field,
            message: message.clone(),
        });
        if !can_cut(&message) || !tree.cut(&path) {
            break;
        }
        cut.push(original.clone());
    }
    found
}

/// The field named by serde's "missing field `name`" message.
fn missing_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("missing field `")?
        .split_once('`')
        .map(|(name, _)| name)
}

/// Whether cutting the field at fault lets deserialization go on meaningfully: a missing
/// field cannot be cut (cutting its parent would only report the parent missing).
fn can_cut(message: &str) -> bool {
    !message.starts_with("missing field")
}
