//! The node agent's and the CNI plugin's questions to the API server: is this pod in the
//! mesh (its labels and its namespace's, the rule discovery uses), does the agent's
//! DaemonSet still exist (on shutdown: an uninstall removes the plugin, an upgrade keeps
//! it), and the kubeconfig the plugin uses when the agent is away.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use ambit_core::enrollment::{DATAPLANE_MODE_LABEL, is_enrolled};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;

/// How long one question to the API server may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads a pod's and its namespace's labels from the API server.
#[derive(Clone)]
pub struct PodLabels {
    client: kube::Client,
}

impl std::fmt::Debug for PodLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodLabels").finish_non_exhaustive()
    }
}

impl PodLabels {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    /// Whether the pod is in the mesh, by the same rule discovery uses.
    pub async fn enrolled(&self, namespace: &str, name: &str) -> Result<bool, String> {
        let ask = async {
            let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
                .get(name)
                .await
                .map_err(|e| format!("reading pod {namespace}/{name}: {e}"))?;
            let ns = Api::<Namespace>::all(self.client.clone())
                .get(namespace)
                .await
                .map_err(|e| format!("reading namespace {namespace}: {e}"))?;
            let label = |labels: &Option<std::collections::BTreeMap<String, String>>| {
                labels
                    .as_ref()
                    .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
                    .cloned()
            };
            let host_network = pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            Ok(is_enrolled(
                label(&pod.metadata.labels).as_deref(),
                label(&ns.metadata.labels).as_deref(),
                host_network,
            ))
        };
        tokio::time::timeout(ASK_TIMEOUT, ask)
            .await
            .unwrap_or_else(|_| Err("the API server did not answer within 5s".into()))
    }
}

impl ambit_cni::agent::PodEnrollment for PodLabels {
    fn is_enrolled<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<bool, String>> + Send + 'a>> {
        Box::pin(self.enrolled(namespace, name))
    }
}

/// The plugin's lookup when the agent is away: a client from the kubeconfig the agent
/// wrote, on a runtime of its own (the plugin is a short-lived process).
#[derive(Debug, Default)]
pub struct PluginLookup;

impl ambit_cni::plugin::EnrollmentLookup for PluginLookup {
    fn is_enrolled(&self, kubeconfig: &Path, namespace: &str, name: &str) -> Result<bool, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let (client, _) = crate::client(Some(kubeconfig))
                .await
                .map_err(|e| e.to_string())?;
            PodLabels::new(client).enrolled(namespace, name).await
        })
    }
}

/// Whether a DaemonSet exists and is not being deleted.
pub async fn daemonset_present(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<bool, String> {
    let api = Api::<DaemonSet>::namespaced(client.clone(), namespace);
    match tokio::time::timeout(ASK_TIMEOUT, api.get_opt(name)).await {
        Err(_) => Err("the API server did not answer within 5s".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(None)) => Ok(false),
        Ok(Ok(Some(ds))) => Ok(ds.metadata.deletion_timestamp.is_none()),
    }
}

/// Where a pod's service-account credentials are mounted.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A kubeconfig for the CNI plugin (which runs on the host, outside any pod), or none
/// when the agent does not run in a pod. Its token is requested for the agent's service
/// account (`POD_NAMESPACE`/`POD_SERVICE_ACCOUNT`) without binding it to the agent's pod,
/// so it outlives a restart or upgrade of the agent (when the plugin needs it), for two
/// hours: write it again well before.
pub async fn plugin_kubeconfig(client: &kube::Client) -> Result<Option<String>, String> {
    let (Ok(host), Ok(namespace), Ok(account)) = (
        std::env::var("KUBERNETES_SERVICE_HOST"),
        std::env::var("POD_NAMESPACE"),
        std::env::var("POD_SERVICE_ACCOUNT"),
    ) else {
        return Ok(None);
    };
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    let ca = std::fs::read(PathBuf::from(SA_DIR).join("ca.crt"))
        .map_err(|e| format!("reading the cluster CA: {e}"))?;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    plugin_kubeconfig_for(
        client,
        &format!("https://{host}:{port}"),
        &ca,
        &namespace,
        &account,
    )
    .await
    .map(Some)
}

/// A kubeconfig reaching `server` (trusting `ca_pem`) with a new token, not bound to any
/// pod, of service account `namespace/account`.
pub async fn plugin_kubeconfig_for(
    client: &kube::Client,
    server: &str,
    ca_pem: &[u8],
    namespace: &str,
    account: &str,
) -> Result<String, String> {
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), namespace);
    let request = k8s_openapi::api::authentication::v1::TokenRequest {
        spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
            expiration_seconds: Some(PLUGIN_TOKEN_LIFETIME.as_secs() as i64),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = tokio::time::timeout(
        ASK_TIMEOUT,
        accounts.create_token_request(account, &Default::default(), &request),
    )
    .await
    .map_err(|_| "the API server did not answer within 5s".to_owned())?
    .map_err(|e| format!("requesting a token for {namespace}/{account}: {e}"))?;
    let token = answer
        .status
        .map(|s| s.token)
        .ok_or("the token request had no token")?;
    Ok(render_kubeconfig(server, ca_pem, &token))
}

/// How long the plugin's token lives; the agent renews it at half that.
pub const PLUGIN_TOKEN_LIFETIME: Duration = Duration::from_secs(2 * 3600);

fn render_kubeconfig(server: &str, ca_pem: &[u8], token: &str) -> String {
    use base64::Engine;
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: ambit-cni\n  user:\n    token: {token}\ncontexts:\n- name: ambit-cni\n  context:\n    cluster: local\n    user: ambit-cni\ncurrent-context: ambit-cni\n",
        ca = base64::engine::general_purpose::STANDARD.encode(ca_pem),
    )
}

/// A byte stream to port `port` of the node proxy running on `node` (a pod of the
/// `ambit-node` DaemonSet in `namespace`), forwarded through the API server like
/// `kubectl port-forward`: the node proxy's admin port listens on localhost only.
pub async fn node_proxy_port(
    client: &kube::Client,
    namespace: &str,
    node: &str,
    port: u16,
) -> Result<
    (
        String,
        impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    ),
    String,
> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let params = kube::api::ListParams::default()
        .labels("app.kubernetes.io/component=ambit-node")
        .fields(&format!("spec.nodeName={node}"));
    let list = tokio::time::timeout(ASK_TIMEOUT, pods.list(&params))
        .await
        .map_err(|_| "the API server did not answer within 5s".to_owned())?
        .map_err(|e| format!("listing the node proxy pods in {namespace}: {e}"))?;
    let running = list.items.into_iter().find(|p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            && p.metadata.deletion_timestamp.is_none()
    });
    let Some(pod) = running else {
        return Err(format!(
            "no running node proxy pod on node {node} in namespace {namespace} (see `kubectl -n {namespace} get pods -l app.kubernetes.io/component=ambit-node -o wide`)"
        ));
    };
    let name = pod.metadata.name.unwrap_or_default();
    let mut forward =
        tokio::time::timeout(Duration::from_secs(10), pods.portforward(&name, &[port]))
            .await
            .map_err(|_| {
                format!("port-forward to {namespace}/{name}:{port} did not start within 10s")
            })?
            .map_err(|e| format!("port-forward to {namespace}/{name}:{port}: {e}"))?;
    let stream = forward
        .take_stream(port)
        .ok_or_else(|| format!("port-forward to {namespace}/{name}:{port} gave no stream"))?;
    // The forwarder runs as long as its stream is used.
    tokio::spawn(async move {
        let _ = forward.join().await;
    });
    Ok((name, stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_kubeconfig_names_server_ca_and_token() {
        let k = render_kubeconfig("https://198.18.0.1:443", b"foo", "tok.en");
        assert!(k.contains("server: https://198.18.0.1:443"));
        assert!(k.contains("certificate-authority-data: Zm9v"));
        assert!(k.contains("token: tok.en"));
        assert!(k.contains("current-context: ambit-cni"));
    }
}
