//! Parsing manifest files: YAML text, one or more documents separated by `---`, each a
//! Kubernetes-style object.
//!
//! A file is accepted or refused as a whole: every document must parse and validate, and
//! each error names the line, column and field path where it was found. Documents of
//! kinds Ambit does not model (a Deployment, a ConfigMap) are skipped and listed, so a
//! folder written for a cluster can be used unchanged.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_saphyr::MessageFormatter;

use super::fields::NamespaceName;
use super::resources::*;
use super::{Kind, Object};

mod tree;

/// One problem in a manifest file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ManifestError {
    /// 1-based line in the file.
    pub line: u64,
    /// 1-based column, when known.
    pub column: u64,
    /// Dotted path of the field at fault (`spec.ports[1].port`), when known.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)?;
        if let Some(field) = &self.field {
            write!(f, ", field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The outcome of parsing one file.
#[derive(Debug, Default)]
pub struct ParsedFile {
    pub objects: Vec<Object>,
    /// The line each object's document starts on (its first line of content), in the
    /// order of `objects`.
    pub lines: Vec<u64>,
    /// Documents skipped because Ambit does not model their kind: `apiVersion kind (line N)`.
    pub ignored: Vec<String>,
}

/// Parses a whole file. Any error refuses the whole file; all errors are reported.
pub fn parse_file(text: &str) -> Result<ParsedFile, Vec<ManifestError>> {
    let mut parsed = ParsedFile::default();
    let mut errors = Vec::new();
    for doc in split_documents(text) {
        match parse_document(doc) {
            Ok(Parsed::Object(object)) => {
                parsed.objects.push(object);
                parsed.lines.push(first_content_line(doc));
            }
            Ok(Parsed::Ignored(what)) => parsed.ignored.push(what),
            Ok(Parsed::Empty) => {}
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(parsed)
    } else {
        Err(errors)
    }
}

/// Parses a file and returns its objects (tests and tools).
pub fn parse_manifest(text: &str) -> Result<Vec<Object>, Vec<ManifestError>> {
    parse_file(text).map(|p| p.objects)
}

/// A document of a multi-document file, with the line it starts on.
#[derive(Debug, Clone, Copy)]
struct Document<'a> {
    text: &'a str,
    /// Lines before this document in the file.
    line_offset: u64,
}

/// Splits a YAML stream at document-start markers (`---` at the beginning of a line).
/// YAML forbids a line starting with `---` inside a document's content, so this is exact
/// for documents that parse; the chunk keeps its marker line, so locations stay right.
fn split_documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 0u64;
    let mut pos = 0usize;
    for (line_no, line) in (0u64..).zip(yaml_lines(text)) {
        let bare = line.trim_end_matches(['\n', '\r']);
        let is_marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if is_marker && pos > start {
            docs.push(Document {
                text: &text[start..pos],
                line_offset: start_line,
            });
            start = pos;
            start_line = line_no;
        }
        pos += line.len();
    }
    if start < text.len() {
        docs.push(Document {
            text: &text[start..],
            line_offset: start_line,
        });
    }
    docs
}

/// Lines as YAML counts them: each ends at `\r\n`, `\n` or a lone `\r` (kept in the line),
/// so line numbers agree with the parser's and with editors'.
pub fn yaml_lines(text: &str) -> impl Iterator<Item = &str> {
    let bytes = text.as_bytes();
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= bytes.len() {
            return None;
        }
        let start = pos;
        while pos < bytes.len() {
            match bytes[pos] {
                b'\n' => {
                    pos += 1;
                    break;
                }
                b'\r' => {
                    pos += 1;
                    if bytes.get(pos) == Some(&b'\n') {
                        pos += 1;
                    }
                    break;
                }
                _ => pos += 1,
            }
        }
        // Line breaks are ASCII, so `start..pos` is on character boundaries.
        Some(&text[start..pos])
    })
}

enum Parsed {
    Object(Object),
    Ignored(String),
    Empty,
}

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        with_snippet: false,
        strict_booleans: true,
    }
}

/// The API groups a mesh is configured with.
const MESH_GROUPS: [&str; 4] = [
    "security.istio.io",
    "networking.istio.io",
    "gateway.networking.k8s.io",
    "networking.ambit.io",
];

/// Every kind of the API groups a mesh is configured with (Istio's and the Gateway
/// API's), modelled by Ambit or not; `None` for other groups.
fn mesh_group_kinds(group: &str) -> Option<&'static [&'static str]> {
    Some(match group {
        "security.istio.io" => &[
            "AuthorizationPolicy",
            "PeerAuthentication",
            "RequestAuthentication",
        ],
        "networking.istio.io" => &[
            "DestinationRule",
            "EnvoyFilter",
            "Gateway",
            "ProxyConfig",
            "ServiceEntry",
            "Sidecar",
            "VirtualService",
            "WorkloadEntry",
            "WorkloadGroup",
        ],
        "gateway.networking.k8s.io" => &[
            "BackendTLSPolicy",
            "GRPCRoute",
            "Gateway",
            "GatewayClass",
            "HTTPRoute",
            "ListenerSet",
            "ReferenceGrant",
            "TCPRoute",
            "TLSRoute",
            "UDPRoute",
        ],
        "networking.ambit.io" => &["LocalRateLimit"],
        _ => return None,
    })
}

/// The known name closest to `word` (by edit distance, case-insensitive), if close
/// enough to be a typo of it.
fn closest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    let w: Vec<char> = word.to_lowercase().chars().collect();
    known
        .iter()
        .map(|k| {
            let k_chars: Vec<char> = k.to_lowercase().chars().collect();
            (edit_distance(&w, &k_chars), *k)
        })
        .filter(|(d, k)| *d <= 1 + k.len() / 5)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut row = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            row.push((prev[j] + cost).min(prev[j + 1] + 1).min(row[j] + 1));
        }
        prev = row;
    }
    prev[b.len()]
}

/// Only `apiVersion` and `kind`, read first to pick the type for the whole document.
#[derive(Deserialize)]
struct Header {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
}

fn is_blank(text: &str) -> bool {
    yaml_lines(text).all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
    })
}

/// The first line of the document that holds content, for errors about the document as
/// a whole.
fn first_content_line(doc: Document<'_>) -> u64 {
    for (i, l) in yaml_lines(doc.text).enumerate() {
        let t = l.trim();
        if !(t.is_empty() || t.starts_with('#') || t == "---") {
            return doc.line_offset + i as u64 + 1;
        }
    }
    doc.line_offset + 1
}

/// Every error of one document (at most [`tree::MAX_ERRORS`]).
type DocErrors = Vec<ManifestError>;

/// `unknown field `x`, expected one of a, b, ...` (serde's wording, with or without
/// backticks around the choices) becomes `unknown field `x`; did you mean `y`?` when one
/// of the choices is a likely typo of it.
fn suggest_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let choices = rest
        .strip_prefix(", expected one of ")
        .or_else(|| rest.strip_prefix(", expected "))?;
    let known: Vec<&str> = choices.split(", ").map(|c| c.trim_matches('`')).collect();
    let near = closest(field, &known)?;
    Some(format!("unknown field `{field}`; did you mean `{near}`?"))
}

fn parse_document(doc: Document<'_>) -> Result<Parsed, DocErrors> {
    if is_blank(doc.text) {
        return Ok(Parsed::Empty);
    }
    let header: Header = serde_saphyr::from_str_with_options(doc.text, options())
        .map_err(|e| vec![yaml_error(doc, &e, None)])?;
    let whole = |field: &str, message: String| {
        vec![ManifestError {
            line: first_content_line(doc),
            column: 1,
            field: Some(field.to_owned()),
            message,
        }]
    };
    let Some(api_version) = header.api_version else {
        return Err(whole(
            "apiVersion",
            "missing: every object needs an apiVersion".into(),
        ));
    };
    let Some(kind) = header.kind else {
        return Err(whole("kind", "missing: every object needs a kind".into()));
    };
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version.as_str()),
    };
    let (model_kind, versions): (Option<Kind>, &[&str]) = match (group, kind.as_str()) {
        ("", "Namespace") => (Some(Kind::Namespace), &["v1"]),
        ("", "Node") => (Some(Kind::Node), &["v1"]),
        ("", "ServiceAccount") => (Some(Kind::ServiceAccount), &["v1"]),
        ("", "Pod") => (Some(Kind::Pod), &["v1"]),
        ("", "Service") => (Some(Kind::Service), &["v1"]),
        ("", "ConfigMap") => (Some(Kind::ConfigMap), &["v1"]),
        ("security.istio.io", "AuthorizationPolicy") => {
            (Some(Kind::AuthorizationPolicy), &["v1", "v1beta1"])
        }
        ("security.istio.io", "PeerAuthentication") => {
            (Some(Kind::PeerAuthentication), &["v1", "v1beta1"])
        }
        ("networking.istio.io", "ServiceEntry") => {
            (Some(Kind::ServiceEntry), &["v1", "v1beta1", "v1alpha3"])
        }
        ("networking.istio.io", "WorkloadEntry") => {
            (Some(Kind::WorkloadEntry), &["v1", "v1beta1", "v1alpha3"])
        }
        ("gateway.networking.k8s.io", "Gateway") => (Some(Kind::Gateway), &["v1", "v1beta1"]),
        ("gateway.networking.k8s.io", "HTTPRoute") => (Some(Kind::HTTPRoute), &["v1", "v1beta1"]),
        ("discovery.k8s.io", "EndpointSlice") => (Some(Kind::EndpointSlice), &["v1", "v1beta1"]),
        ("gateway.networking.k8s.io", "GRPCRoute") => (Some(Kind::GRPCRoute), &["v1", "v1alpha2"]),
        ("networking.istio.io", "VirtualService") => {
            (Some(Kind::VirtualService), &["v1", "v1beta1", "v1alpha3"])
        }
        ("networking.istio.io", "DestinationRule") => {
            (Some(Kind::DestinationRule), &["v1", "v1beta1", "v1alpha3"])
        }
        ("networking.ambit.io", "LocalRateLimit") => (Some(Kind::LocalRateLimit), &["v1alpha1"]),
        ("security.istio.io", "RequestAuthentication") => {
            (Some(Kind::RequestAuthentication), &["v1", "v1beta1"])
        }
        ("gateway.networking.k8s.io", "ReferenceGrant") => {
            (Some(Kind::ReferenceGrant), &["v1", "v1beta1", "v1alpha2"])
        }
        _ => (None, &[]),
    };
    let Some(model_kind) = model_kind else {
        // In the mesh's own groups every kind is known: one that is not is a typo, and
        // skipping it would drop a policy without a word.
        if let Some(known) = mesh_group_kinds(group)
            && !known.contains(&kind.as_str())
        {
            let hint = closest(&kind, known)
                .map(|k| format!("did you mean {k}? "))
                .unwrap_or_default();
            return Err(whole(
                "kind",
                format!(
                    "{group} has no kind {kind}; {hint}(its kinds: {})",
                    known.join(", ")
                ),
            ));
        }
        // A group one typo away from the mesh's: a policy written there would be skipped.
        if mesh_group_kinds(group).is_none()
            && let Some(real) = closest(group, &MESH_GROUPS)
        {
            return Err(whole(
                "apiVersion",
                format!("{api_version}: there is no API group {group}; did you mean {real}?"),
            ));
        }
        return Ok(Parsed::Ignored(format!(
            "{api_version} {kind} (line {})",
            first_content_line(doc)
        )));
    };
    if !versions.contains(&version) {
        let supported: Vec<String> = versions
            .iter()
            .map(|v| {
                if group.is_empty() {
                    (*v).to_owned()
                } else {
                    format!("{group}/{v}")
                }
            })
            .collect();
        return Err(whole(
            "apiVersion",
            format!(
                "{kind} is not supported in {api_version}; use {}",
                supported.join(" or ")
            ),
        ));
    }
    let object = match model_kind {
        Kind::Namespace => {
            let mut ns: Namespace = typed(doc)?;
            ns.metadata.namespace = None;
            Object::Namespace(Arc::new(ns))
        }
        Kind::Node => {
            let mut node: Node = typed(doc)?;
            node.metadata.namespace = None;
            Object::Node(Arc::new(node))
        }
        Kind::ServiceAccount => {
            let mut o: ServiceAccount = typed(doc)?;
            default_namespace(&mut o.metadata);
            Object::ServiceAccount(Arc::new(o))
        }
        Kind::Pod => {
            let mut o: Pod = typed(doc)?;
            default_namespace(&mut o.metadata);
            Object::Pod(Arc::new(o))
        }
        Kind::Service => {
            let mut o: Service = typed(doc)?;
            default_namespace(&mut o.metadata);
            checked(doc, check_service(&o))?;
            Object::Service(Arc::new(o))
        }
        Kind::AuthorizationPolicy => {
            let mut o: AuthorizationPolicy = typed(doc)?;
            default_namespace(&mut o.metadata);
            checked(doc, check_authorization_policy(&o.spec))?;
            Object::AuthorizationPolicy(Arc::new(o))
        }
        Kind::PeerAuthentication => {
            let mut o: PeerAuthentication = typed(doc)?;
            default_namespace(&mut o.metadata);
            let mut problems = Vec::new();
            if !o.spec.port_level_mtls.is_empty() && o.spec.selector.is_none() {
                problems.push((
                    "spec.portLevelMtls".to_owned(),
                    "portLevelMtls needs spec.selector: port-level settings apply to selected workloads only".to_owned(),
                ));
            }
            checked(doc, problems)?;
            Object::PeerAuthentication(Arc::new(o))
        }
        Kind::ServiceEntry => {
            let mut o: ServiceEntry = typed(doc)?;
            default_namespace(&mut o.metadata);
            let mut problems = Vec::new();
            if o.spec.hosts.is_empty() {
                problems.push((
                    "spec.hosts".to_owned(),
                    "at least one host is required".to_owned(),
                ));
            }
            checked(doc, problems)?;
            Object::ServiceEntry(Arc::new(o))
        }
        Kind::WorkloadEntry => {
            let mut o: WorkloadEntry = typed(doc)?;
            default_namespace(&mut o.metadata);
            Object::WorkloadEntry(Arc::new(o))
        }
        Kind::Gateway => {
            let mut o: Gateway = typed(doc)?;
            default_namespace(&mut o.metadata);
            let mut problems = Vec::new();
            if o.spec.listeners.is_empty() {
                problems.push((
                    "spec.listeners".to_owned(),
                    "at least one listener is required".to_owned(),
                ));
            }
            checked(doc, problems)?;
            Object::Gateway(Arc::new(o))
        }
        Kind::VirtualService => {
            let mut o: VirtualService = typed(doc)?;
            default_namespace(&mut o.metadata);
            Object::VirtualService(Arc::new(o))
        }
        Kind::DestinationRule => {
            let mut o: DestinationRule = typed(doc)?;
            default_namespace(&mut o.metadata);
            Object::DestinationRule(Arc::new(o))
        }
        Kind::ReferenceGrant => {
            let mut o: ReferenceGrant = typed(doc)?;
            default_namespace(&mut o.metadata);
            Object::ReferenceGrant(Arc::new(o))
        }
        Kind::LocalRateLimit => {
            let mut o: LocalRateLimit = typed(doc)?;
            default_namespace(&mut o.metadata);
            Object::LocalRateLimit(Arc::new(o))
        }
        Kind::ConfigMap => {
            let mut o: ConfigMap = typed(doc)?;
            // Only the mesh config (`istio`) is read; other ConfigMaps are listed.
            if o.metadata.name.as_str() != MESH_CONFIG_MAP {
                return Ok(Parsed::Ignored(format!(
                    "{api_version} {kind} (line {})",
                    first_content_line(doc)
                )));
            }
            default_namespace(&mut o.metadata);
            Object::ConfigMap(Arc::new(o))
        }
        Kind::RequestAuthentication => {
            let mut o: RequestAuthentication = typed(doc)?;
            default_namespace(&mut o.metadata);
            Object::RequestAuthentication(Arc::new(o))
        }
        Kind::GRPCRoute => {
            let mut o: GrpcRoute = typed(doc)?;
            default_namespace(&mut o.metadata);
            Object::GrpcRoute(Arc::new(o))
        }
        Kind::EndpointSlice => {
            let mut o: EndpointSlice = typed(doc)?;
            default_namespace(&mut o.metadata);
            Object::EndpointSlice(Arc::new(o))
        }
        Kind::HTTPRoute => {
            let mut o: HttpRoute = typed(doc)?;
            default_namespace(&mut o.metadata);
            Object::HttpRoute(Arc::new(o))
        }
    };
    Ok(Parsed::Object(object))
}

fn default_namespace(meta: &mut ObjectMeta) {
    if meta.namespace.is_none() {
        meta.namespace = Some(NamespaceName::default_namespace());
    }
}

/// Deserializes a document into `T`. On failure, every error of the document: the first
/// as the YAML deserializer found it, then the others found by cutting each faulty field
/// and trying again (see [`tree`]).
fn typed<T: DeserializeOwned>(doc: Document<'_>) -> Result<T, DocErrors> {
    let mut path = None;
    let result = serde_saphyr::with_deserializer_from_str_with_options(doc.text, options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            let p = e.path().to_string();
            if p != "." {
                path = Some(p);
            }
            e.into_inner()
        })
    });
    let err = match result {
        Ok(value) => return Ok(value),
        Err(err) => err,
    };
    let first_field = path.clone().unwrap_or_default();
    let mut errors = vec![yaml_error(doc, &err, path)];
    if let Some(mut tree) = tree::read(doc.text, options()) {
        errors.extend(
            tree::more_errors::<T>(&mut tree, &first_field)
                .into_iter()
                .map(|f| ManifestError {
                    line: doc.line_offset + f.line.max(1),
                    column: f.column.max(1),
                    field: (!f.field.is_empty()).then_some(f.field),
                    message: one_line(&f.message),
                }),
        );
    }
    Err(errors)
}

/// The problems a check found on a typed object, each at the line of its field.
fn checked(doc: Document<'_>, problems: Vec<(String, String)>) -> Result<(), DocErrors> {
    if problems.is_empty() {
        return Ok(());
    }
    let tree = tree::read(doc.text, options());
    Err(problems
        .into_iter()
        .map(|(field, message)| {
            let (line, column) = tree
                .as_ref()
                .map(|t| t.locate(&tree::steps(&field)))
                .filter(|(line, _)| *line > 0)
                .map(|(line, column)| (doc.line_offset + line, column.max(1)))
                .unwrap_or((first_content_line(doc), 1));
            ManifestError {
                line,
                column,
                field: Some(field),
                message,
            }
        })
        .collect())
}

fn yaml_error(
    doc: Document<'_>,
    err: &serde_saphyr::Error,
    field: Option<String>,
) -> ManifestError {
    let (line, column) = match err.location() {
        Some(loc) if loc.line() > 0 => (doc.line_offset + loc.line(), loc.column().max(1)),
        _ => (first_content_line(doc), 1),
    };
    let message = serde_saphyr::DefaultMessageFormatter.format_message(err.without_snippet());
    ManifestError {
        line,
        column,
        field,
        message: one_line(&message),
    }
}

/// A message that may quote the input, kept on one line and free of control characters
/// (escaped); quotes stay as they are. An unknown field one typo away from a known one
/// names that one instead of listing them all.
fn one_line(message: &str) -> String {
    let message = suggest_field(message).unwrap_or_else(|| message.to_owned());
    let message = message.as_str();
    let mut out = String::with_capacity(message.len());
    for c in message.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// A problem a check found: the field (dotted path) and what is wrong with it.
type Problem = (String, String);

fn check_service(svc: &Service) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut problem = |field: &str, message: String| problems.push((field.to_owned(), message));
    if svc.spec.kind == Some(ServiceType::ExternalName) && svc.spec.external_name.is_none() {
        problem(
            "spec.externalName",
            "required for a service of type ExternalName".into(),
        );
    }
    let ports = &svc.spec.ports;
    if ports.len() > 1 {
        for (i, p) in ports.iter().enumerate() {
            if p.name.as_deref().unwrap_or("").is_empty() {
                problem(
                    &format!("spec.ports[{i}]"),
                    format!(
                        "port #{i} needs a name: every port of a multi-port service must be named"
                    ),
                );
            }
        }
    }
    for (i, a) in ports.iter().enumerate() {
        for (j, b) in ports.iter().enumerate().skip(i + 1) {
            if a.name.is_some() && a.name == b.name {
                problem(
                    &format!("spec.ports[{j}].name"),
                    format!(
                        "port name {} is used twice (also by port #{i})",
                        a.name.as_deref().unwrap_or("")
                    ),
                );
            }
            if a.port == b.port
                && a.protocol.unwrap_or(Protocol::Tcp) == b.protocol.unwrap_or(Protocol::Tcp)
            {
                problem(
                    &format!("spec.ports[{j}].port"),
                    format!(
                        "port {} is listed twice for the same protocol (also by port #{i})",
                        a.port.0
                    ),
                );
            }
        }
    }
    problems
}

/// Rules Istio's own validation applies to an AuthorizationPolicy.
fn check_authorization_policy(spec: &AuthorizationPolicySpec) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut problem = |field: String, message: &str| problems.push((field, message.to_owned()));
    if spec.target_ref.is_some() && !spec.target_refs.is_empty() {
        problem(
            "spec.targetRef".into(),
            "use either targetRef or targetRefs, not both",
        );
    }
    if spec.selector.is_some() && (spec.target_ref.is_some() || !spec.target_refs.is_empty()) {
        problem(
            "spec.selector".into(),
            "use either selector or targetRef(s), not both",
        );
    }
    match (spec.action, &spec.provider) {
        (Some(AuthorizationAction::Custom), None) => {
            problem("spec.provider".into(), "action CUSTOM needs a provider");
        }
        (action, Some(_)) if action != Some(AuthorizationAction::Custom) => {
            problem(
                "spec.provider".into(),
                "a provider is only allowed with action CUSTOM",
            );
        }
        _ => {}
    }
    for (r, rule) in spec.rules.iter().enumerate() {
        for (i, from) in rule.from.iter().enumerate() {
            if from.source == Source::default() {
                problem(
                    format!("spec.rules[{r}].from[{i}].source"),
                    "must not be empty: name at least one source field",
                );
            }
        }
        for (i, to) in rule.to.iter().enumerate() {
            if to.operation == Operation::default() {
                problem(
                    format!("spec.rules[{r}].to[{i}].operation"),
                    "must not be empty: name at least one operation field",
                );
            }
        }
        for (i, cond) in rule.when.iter().enumerate() {
            if cond.values.is_empty() && cond.not_values.is_empty() {
                problem(
                    format!("spec.rules[{r}].when[{i}]"),
                    "needs values or notValues",
                );
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests;
