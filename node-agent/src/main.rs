//! The `ambit-agent` binary.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use ambit_agent::agent::Agent;
use ambit_agent::config::{Config, Mode};
use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::info;

/// Ambit's node agent: enrols this node's pods into the ambient mesh and hands them to ztunnel.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The agent's YAML config file.
    #[arg(long, env = "AMBIT_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The socket the CNI plugin connects to.
    #[arg(long, env = "AMBIT_CNI_SOCKET")]
    cni_socket: Option<PathBuf>,
    /// The ZDS socket ztunnel connects to.
    #[arg(long, env = "AMBIT_ZDS_SOCKET")]
    zds_socket: Option<PathBuf>,
    /// Where enrolled pods are recorded.
    #[arg(long, env = "AMBIT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Remove Ambit from this node: un-enrol every recorded pod (their rules go, traffic flows uncaptured),
    /// take ambit-cni out of the CNI config and the bin dir, and remove the node's probe rules. An agent
    /// restart or upgrade never does this; run it when Ambit is being removed from the node.
    Uninstall,
    /// Debug capture: is a pod really captured, and if not, why? Changes nothing unless `--repair` is given.
    /// Exit codes: 0 as it should be, 3 not captured, 4 cannot tell, 5 captured but the node is degraded.
    Debug {
        #[command(subcommand)]
        what: DebugCmd,
        /// Output: `text` (default) or `json`.
        #[arg(short = 'o', long, default_value = "text", global = true)]
        output: Output,
        /// ztunnel's admin endpoint, when it is not found by itself (loopback listeners of a `ztunnel` process).
        #[arg(long, global = true)]
        ztunnel_admin: Option<std::net::SocketAddr>,
        /// The bound on each check, in milliseconds.
        #[arg(long, default_value_t = 2000, global = true)]
        timeout_ms: u64,
    },
}

#[derive(Debug, Subcommand)]
enum DebugCmd {
    /// One pod: enrolment, rules against what the agent installs, routing, sockets, ztunnel's view, and probes
    /// that prove capture without sending traffic off the node.
    Pod {
        /// NAMESPACE/NAME, a pod UID, or a netns path.
        pod: ambit_agent::debug::Target,
        /// Ask the agent to reinstall the pod's expected rules and routing, then check again.
        #[arg(long)]
        repair: bool,
        /// Skip the active probes.
        #[arg(long)]
        no_probe: bool,
    },
    /// Every pod the agent holds, one verdict each, and the node's CNI config, plugin, agent and ztunnel.
    Node,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(n) = args.node_name {
        config.node_name = n;
    }
    if let Some(p) = args.cni_socket {
        config.cni_socket = p;
    }
    if let Some(p) = args.zds_socket {
        config.zds_socket = p;
    }
    if let Some(p) = args.state_dir {
        config.state_dir = p;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    match args.cmd {
        None | Some(Cmd::Run) => rt.block_on(run(config, args.config)),
        Some(Cmd::Uninstall) => rt.block_on(ambit_agent::agent::uninstall(&config)),
        Some(Cmd::Debug { what, output, ztunnel_admin, timeout_ms }) => {
            let opts = ambit_agent::debug::inspect::Options {
                config,
                ztunnel_admin,
                timeout: std::time::Duration::from_millis(timeout_ms.max(1)),
                probe: !matches!(what, DebugCmd::Pod { no_probe: true, .. }),
            };
            let code = rt.block_on(debug(what, output, &opts));
            // Threads stuck in a netns (a hung tool) must not keep the process: the answer is out.
            std::process::exit(code)
        }
    }
}

async fn debug(what: DebugCmd, output: Output, opts: &ambit_agent::debug::inspect::Options) -> i32 {
    use ambit_agent::debug::{self, inspect};
    let print = |text: String, value: serde_json::Value| match output {
        Output::Text => print!("{text}"),
        Output::Json => println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default()),
    };
    match what {
        DebugCmd::Pod { pod, repair, .. } => {
            let mut report = inspect::pod(&pod, opts).await;
            if repair {
                let done = inspect::repair(opts, &report.pod).await;
                if done.ok {
                    report = inspect::pod(&pod, opts).await;
                }
                report.repair = Some(done);
            }
            print(debug::render_pod(&report), serde_json::to_value(&report).unwrap_or_default());
            report.exit_code()
        }
        DebugCmd::Node => {
            let report = inspect::node(opts).await;
            print(debug::render_node(&report), serde_json::to_value(&report).unwrap_or_default());
            report.exit_code()
        }
    }
}

async fn run(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let cni_socket = config.cni_socket.clone();
    let zds_socket = config.zds_socket.clone();
    if let Some(dir) = zds_socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let health_addr = config.health_addr;
    let installer =
        config.install.enabled.then(|| ambit_agent::installer::Installer::new(config.install.clone(), &cni_socket));
    let mode = config.mode;
    let kube_cfg = config.kubernetes.clone();
    let node_name = config.node_name.clone();
    let agent = Agent::new(config, config_path).context("starting the agent")?;
    agent.reconcile().await;
    let own_namespace = std::env::var("POD_NAMESPACE").ok();
    let kube = if mode == Mode::Kubernetes {
        let (kube, queue) = ambit_agent::k8s::Kube::connect(&kube_cfg, &node_name, own_namespace.as_deref()).await?;
        agent.set_kube(kube.clone());
        let (asks, asked) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(agent.clone().serve_controller(asked));
        tokio::spawn(ambit_agent::k8s::run(asks, kube.clone(), queue));
        Some(kube)
    } else {
        None
    };
    let zds = ambit_proto::seqpacket::SeqPacketListener::bind(&zds_socket)
        .with_context(|| format!("listening for ztunnel on {}", zds_socket.display()))?;
    let cni = ambit_agent::cniserver::bind(&cni_socket)
        .with_context(|| format!("listening for the CNI plugin on {}", cni_socket.display()))?;
    info!(cni = %cni_socket.display(), zds = %zds_socket.display(), pods = agent.pods().len(), "ambit-agent ready");
    tokio::spawn(agent.clone().serve_zds(zds));
    // DELs the plugin left while no agent listened (from now on they come over the socket), beside serving it:
    // each takes its pod's lock.
    let replay = agent.clone();
    tokio::spawn(async move { replay.replay_deferred_dels().await });
    let (calls, called) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(agent.clone().serve_plugin(called));
    tokio::spawn(ambit_agent::cniserver::serve(cni, calls));
    tokio::spawn(agent.clone().sweep_forever());
    ambit_agent::health::serve(health_addr, agent.clone())
        .await
        .with_context(|| format!("health endpoint on {health_addr}"))?;
    let mut install_watch = None;
    if let Some(installer) = installer {
        let (a, b) = (agent.clone(), agent.clone());
        install_watch = Some(ambit_agent::installer::watch(
            installer,
            move |s| a.set_install_state(s),
            move || {
                b.metrics().installer_repairs.inc();
            },
        ));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // An upgrade (the usual case): pods keep their rules, ztunnel keeps serving them, the plugin stays
    // installed (new pods wait for the next agent), and the next agent re-adopts everything. Only when the
    // agent's DaemonSet is going away is Ambit removed from the node.
    // Asking the API must not hold up the shutdown: no answer within 5 s counts as an upgrade.
    let removing = match (&kube, std::env::var("POD_NAME")) {
        (Some(k), Ok(pod)) => tokio::time::timeout(
            std::time::Duration::from_secs(5),
            k.being_removed(own_namespace.as_deref().unwrap_or_default(), &pod),
        )
        .await
        .unwrap_or(false),
        _ => false,
    };
    if removing {
        info!("the agent's DaemonSet is being deleted: removing Ambit from this node");
        if let Some(w) = install_watch.take() {
            w.stop();
        }
        if let Err(e) = agent.uninstall().await {
            tracing::warn!("{e:#}");
        }
        return Ok(());
    }
    info!("shutting down; enrolled pods stay captured and served");
    let _ = std::fs::remove_file(&cni_socket);
    let _ = std::fs::remove_file(&zds_socket);
    Ok(())
}
