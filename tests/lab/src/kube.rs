//! The Kubernetes tier: a real etcd and kube-apiserver (built from Debian's source package, see
//! `scripts/kube-apiserver`) in their own network namespace on the lab's fabric, reachable by every node, and a
//! client for tests that plays the kubelet.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::netns::Netns;
use crate::proc::Proc;
use crate::util::wait_for;

/// The API server's address on the fabric.
pub const API_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 250);
/// Its port.
pub const API_PORT: u16 = 6443;
/// The admin token.
pub const TOKEN: &str = "ambit-lab-admin-token";

/// Where the API server binary is: `$AMBIT_KUBE_APISERVER`, or the cache `scripts/kube-build` fills.
pub fn apiserver_binary() -> PathBuf {
    match std::env::var_os("AMBIT_KUBE_APISERVER") {
        Some(p) => PathBuf::from(p),
        None => crate::cluster::binary("kube-apiserver").unwrap_or_else(|e| panic!("{e:#}")),
    }
}

/// A running etcd + kube-apiserver.
pub struct KubeApi {
    netns: Netns,
    etcd: Option<Proc>,
    apiserver: Option<Proc>,
    dir: PathBuf,
    /// The kubeconfig the agents use.
    pub kubeconfig: PathBuf,
    /// The cluster tier: ServiceAccount admission on (pods get their tokens), kubelets reached by address.
    pub cluster: bool,
}

fn write_keys(dir: &Path) -> anyhow::Result<()> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    std::fs::write(dir.join("sa.key"), key.serialize_pem())?;
    std::fs::write(dir.join("sa.pub"), key.public_key_pem())?;
    std::fs::write(dir.join("tokens.csv"), format!("{TOKEN},admin,1,\"system:masters\"\n"))?;
    Ok(())
}

impl KubeApi {
    /// Starts etcd and the API server in a new netns `name` attached to the fabric bridge `br0` of `fabric`,
    /// and waits until the API answers.
    pub fn start(name: &str, fabric: &Netns, dir: &Path) -> anyhow::Result<KubeApi> {
        std::fs::create_dir_all(dir)?;
        write_keys(dir)?;
        let netns = Netns::create(name)?;
        fabric.ip(&["link", "add", "api0", "type", "veth", "peer", "name", "eth0", "netns", netns.name()])?;
        fabric.ip(&["link", "set", "api0", "master", "br0", "up"])?;
        netns.ip(&["addr", "add", &format!("{API_IP}/24"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://{API_IP}:{API_PORT}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {TOKEN}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: admin}}\ncurrent-context: lab\n"
            ),
        )?;
        let mut api =
            KubeApi { netns, etcd: None, apiserver: None, dir: dir.to_path_buf(), kubeconfig, cluster: false };
        api.start_etcd()?;
        api.start_apiserver()?;
        Ok(api)
    }

    fn start_etcd(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.netns.command("etcd");
        cmd.args(["--name", "lab", "--data-dir"]).arg(self.dir.join("etcd")).args([
            "--listen-client-urls",
            "http://127.0.0.1:2379",
            "--advertise-client-urls",
            "http://127.0.0.1:2379",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "lab=http://127.0.0.1:2380",
            "--unsafe-no-fsync",
        ]);
        self.etcd = Some(Proc::spawn("etcd", cmd, &self.dir.join("etcd.log"))?);
        Ok(())
    }

    /// Starts (again) the API server and waits until it serves.
    pub fn start_apiserver(&mut self) -> anyhow::Result<()> {
        let d = &self.dir;
        let mut cmd = self.netns.command(apiserver_binary());
        cmd.arg("--etcd-servers=http://127.0.0.1:2379")
            .arg(format!("--bind-address={API_IP}"))
            .arg(format!("--secure-port={API_PORT}"))
            .arg(format!("--advertise-address={API_IP}"))
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!("--token-auth-file={}", d.join("tokens.csv").display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", d.join("sa.pub").display()))
            .arg(format!("--service-account-signing-key-file={}", d.join("sa.key").display()))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--allow-privileged=true")
            .arg("--enable-priority-and-fairness=false")
            .arg("--kubelet-preferred-address-types=InternalIP");
        if !self.cluster {
            cmd.arg("--disable-admission-plugins=ServiceAccount");
        }
        self.apiserver = Some(Proc::spawn("kube-apiserver", cmd, &self.dir.join("apiserver.log"))?);
        let apiserver = self.apiserver.as_ref().expect("just set");
        wait_for("the API server to serve", Duration::from_secs(60), || {
            self.run(|c| async move { c.apiserver_version().await.is_ok() }).ok().filter(|ok| *ok)
        })
        .with_context(|| apiserver.log().lines().rev().take(30).collect::<Vec<_>>().join("\n"))?;
        Ok(())
    }

    /// Its netns (controller-manager and scheduler run there).
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Its directory (keys, certificates, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Restarts the API server for the cluster tier (ServiceAccount admission on).
    pub fn enable_cluster(&mut self) -> anyhow::Result<()> {
        self.cluster = true;
        self.stop_apiserver();
        self.start_apiserver()
    }

    /// Stops the API server (etcd stays): the API becomes unreachable.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut a) = self.apiserver.take() {
            a.stop(Duration::from_secs(5));
        }
    }

    /// Runs `f` with a client whose connections are made from inside the API's netns.
    pub fn run<F, Fut, T>(&self, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(kube::Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let kubeconfig = self.kubeconfig.clone();
        self.netns.run(move || -> anyhow::Result<T> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
                let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
                let client = kube::Client::try_from(cfg)?;
                Ok(f(client).await)
            })
        })?
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop_apiserver();
        if let Some(mut e) = self.etcd.take() {
            e.stop(Duration::from_secs(5));
        }
    }
}
