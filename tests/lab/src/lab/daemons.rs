//! The lab as process supervisor: each node's agent and ztunnel, started, stopped, killed, waited for.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;

use super::*;
use crate::net::http_get;
use crate::proc::Proc;
use crate::util::{binary, wait_for};

impl Lab {
    /// Starts (or restarts) node `i`'s agent without waiting for anything.
    pub fn spawn_agent(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn_agent_with_env(i, &[])
    }

    /// [`Lab::spawn_agent`] with extra environment (e.g. the `POD_NAME` of the agent's own pod).
    pub fn spawn_agent_with_env(&mut self, i: usize, env: &[(&str, &str)]) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        if let Some(mut old) = node.agent.take() {
            old.stop(Duration::from_secs(5));
        }
        let _ = std::fs::remove_file(node.cni_socket());
        let mut cmd = node.netns.command(binary("ambit-agent"));
        cmd.arg("--config").arg(node.dir.join("agent.yaml")).env("RUST_LOG", &self.config.log_level);
        cmd.envs(env.iter().copied());
        let p = Proc::spawn("ambit-agent", cmd, &node.dir.join("agent.log"))?;
        node.agent = Some(p);
        Ok(())
    }

    /// Starts (or restarts) node `i`'s agent and waits until it serves the plugin with ambit-cni chained (and,
    /// when its ztunnel runs, until that ztunnel is connected).
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn_agent(i)?;
        let node = &self.nodes[i];
        let sock = node.cni_socket();
        let cni = node.cni.clone();
        wait_for(&format!("{}'s agent socket and chained CNI config", node.name), Duration::from_secs(10), || {
            let chained = cni.load_conflist().ok()?["plugins"].as_array()?.iter().any(|p| p["type"] == "ambit-cni");
            (sock.exists() && chained).then_some(())
        })
        .with_context(|| node.agent.as_ref().map(|a| a.log()).unwrap_or_default())?;
        if node.ztunnel.is_some() {
            self.wait_agent_ready(i)?;
        }
        Ok(())
    }

    /// GET on node `i`'s agent health endpoint.
    pub fn agent_get(&self, i: usize, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(&self.nodes[i].netns, SocketAddr::from((Ipv4Addr::LOCALHOST, AGENT_HEALTH_PORT)), path)
    }

    /// Runs `ambit-agent <args>` once on node `i` (e.g. `uninstall`) with the node's agent config.
    pub fn agent_command(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let (code, text) = self.agent_cli(i, args)?;
        anyhow::ensure!(code == 0, "ambit-agent {} failed: {text}", args.join(" "));
        Ok(text)
    }

    /// Runs `ambit-agent <args>` on node `i` with the node's agent config: its exit code, stdout then stderr.
    fn agent_cli(&self, i: usize, args: &[&str]) -> anyhow::Result<(i32, String)> {
        let node = &self.nodes[i];
        let out = node
            .netns
            .command(binary("ambit-agent"))
            .arg("--config")
            .arg(node.dir.join("agent.yaml"))
            .args(args)
            .output()?;
        let code = out.status.code().ok_or_else(|| anyhow::anyhow!("ambit-agent killed: {:?}", out.status))?;
        Ok((code, String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)))
    }

    /// Runs `ambit-agent debug <args>` on node `i` with the node's agent config; returns its exit code and output.
    pub fn debug(&self, i: usize, args: &[&str]) -> anyhow::Result<(i32, String)> {
        self.agent_cli(i, &[&["debug"], args].concat())
    }

    /// Waits until node `i`'s agent reports ready (plugin installed, a ztunnel connected).
    pub fn wait_agent_ready(&self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        wait_for(&format!("{}'s agent to be ready", node.name), Duration::from_secs(10), || {
            matches!(self.agent_get(i, "/readyz"), Ok((200, _))).then_some(())
        })
        .with_context(|| node.agent.as_ref().map(|a| a.log()).unwrap_or_default())
    }

    /// The environment ztunnel gets on node `i`.
    pub fn ztunnel_env(&self, i: usize) -> Vec<(String, String)> {
        let node = &self.nodes[i];
        let root = self.dir.join("ca-cert.pem").display().to_string();
        let kv = |k: &str, v: String| (k.to_string(), v);
        let mut env = vec![
            kv("INPOD_UDS", node.zds_socket().display().to_string()),
            kv("NODE_NAME", node.name.clone()),
            kv("TRUST_DOMAIN", TRUST_DOMAIN.to_string()),
            kv("RUST_LOG", self.config.log_level.clone()),
        ];
        if self.config.control_plane {
            // As Istio's DaemonSet sets them: istiod for both, the mounted root and projected token.
            let istiod = format!("https://{}:{}", crate::controlplane::CP_IP, crate::controlplane::CP_PORT);
            env.extend([
                kv("CA_ADDRESS", istiod.clone()),
                kv("XDS_ADDRESS", istiod),
                kv("CA_ROOT_CA", root.clone()),
                kv("XDS_ROOT_CA", root),
                kv("AUTH_TOKEN", node.dir.join("istio-token").display().to_string()),
                kv("POD_NAME", format!("ztunnel-{}", node.name)),
                kv("POD_NAMESPACE", "istio-system".into()),
                kv("INSTANCE_IP", node.ip.to_string()),
            ]);
        } else {
            env.extend([
                kv("LOCAL_XDS_PATH", self.workloads_path().display().to_string()),
                kv("XDS_ADDRESS", String::new()),
                kv("AMBIT_LOCAL_CA_CERT", root),
                kv("AMBIT_LOCAL_CA_KEY", self.dir.join("ca-key.pem").display().to_string()),
            ]);
        }
        env.extend(self.config.ztunnel_env.iter().cloned());
        if let Some(peer) = self.peer_on(i) {
            env.extend(peer.env.iter().cloned());
        }
        env
    }

    /// The peer ztunnel, if node `i` runs it.
    fn peer_on(&self, i: usize) -> Option<&crate::PeerZtunnel> {
        self.config.peer.as_ref().filter(|p| p.nodes.contains(&i))
    }

    /// The ztunnel binary of node `i`: the peer's on its nodes, else the configured one, else Ambit's.
    pub fn ztunnel_binary(&self, i: usize) -> std::path::PathBuf {
        match self.peer_on(i) {
            Some(peer) => peer.binary.clone(),
            None => self.config.ztunnel.clone().unwrap_or_else(|| binary("ztunnel")),
        }
    }

    /// Starts (or restarts) node `i`'s ztunnel (not waiting for readiness).
    pub fn start_ztunnel(&mut self, i: usize) -> anyhow::Result<()> {
        let env = self.ztunnel_env(i);
        let bin = self.ztunnel_binary(i);
        let node = &mut self.nodes[i];
        if let Some(mut old) = node.ztunnel.take() {
            old.stop(Duration::from_secs(10));
        }
        let mut cmd = node.netns.command(bin);
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").envs(env);
        node.ztunnel = Some(Proc::spawn("ztunnel", cmd, &node.dir.join("ztunnel.log"))?);
        Ok(())
    }

    /// Kills node `i`'s ztunnel outright (SIGKILL: no drain).
    pub fn kill_ztunnel(&mut self, i: usize) {
        if let Some(mut z) = self.nodes[i].ztunnel.take() {
            z.kill();
        }
    }

    /// Kills node `i`'s agent outright (SIGKILL: no shutdown).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut a) = self.nodes[i].agent.take() {
            a.kill();
        }
    }

    /// Starts another ztunnel on node `i` beside the running one (an upgrade's surge), its control ports moved
    /// by `port_offset` so both can run in the node's netns. The caller owns the process.
    pub fn spawn_extra_ztunnel(&self, i: usize, port_offset: u16, log_name: &str) -> anyhow::Result<Proc> {
        let mut env = self.ztunnel_env(i);
        env.push(("ADMIN_ADDR".into(), format!("127.0.0.1:{}", ADMIN_PORT + port_offset)));
        env.push(("STATS_ADDR".into(), format!("[::]:{}", METRICS_PORT + port_offset)));
        env.push(("READINESS_ADDR".into(), format!("[::]:{}", READY_PORT + port_offset)));
        let bin = self.ztunnel_binary(i);
        let node = &self.nodes[i];
        let mut cmd = node.netns.command(bin);
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").envs(env);
        Proc::spawn("ztunnel", cmd, &node.dir.join(log_name))
    }

    /// Waits until node `i`'s ztunnel reports ready (connected to the agent and synced).
    pub fn wait_ready(&self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        wait_for(&format!("{}'s ztunnel to be ready", node.name), Duration::from_secs(20), || {
            matches!(node.ztunnel_get(READY_PORT, "/healthz/ready"), Ok((200, _))).then_some(())
        })
        .with_context(|| node.ztunnel.as_ref().map(|z| z.log()).unwrap_or_default())
    }
}
