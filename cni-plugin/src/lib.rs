//! `ambit-cni`: Ambit's chained CNI plugin.
//!
//! It runs after the primary CNI (bridge, Calico, Cilium, …), passes the primary's result through untouched,
//! and tells the node agent about the pod over the agent's unix socket (the API in
//! [`ambit_proto::cni_api`]). The agent decides whether the pod is enrolled, captures its traffic and hands it
//! to ztunnel before it answers; until then ADD blocks, and if anything fails ADD fails, so an enrolled pod
//! never starts with its traffic uncaptured.
//!
//! Everything here but [`agent::call`] and the log file is pure, so [`run`] is tested with a fake environment.
#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod env;
pub mod error;
pub mod log;
pub mod result;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_proto::cni_api::{self, Attachment, ErrorCode, Outcome, Request, Response};
use serde_json::Value;

use config::NetConf;
use env::{CniEnv, Command};
use error::{CniError, code};
use log::{Level, Logger};

/// How the plugin reaches the agent; a trait so tests can stand in for the socket.
pub trait AgentClient {
    /// One request/response exchange.
    fn call(&self, socket: &Path, request: &Request, timeout: Duration) -> Result<Response, agent::AgentError>;
    /// Leaves a DEL the agent could not take for it to carry out when it is back.
    fn defer(&self, socket: &Path, request: &Request) -> std::io::Result<PathBuf>;
}

/// The real client: the agent's unix socket.
pub struct SocketClient;

impl AgentClient for SocketClient {
    fn call(&self, socket: &Path, request: &Request, timeout: Duration) -> Result<Response, agent::AgentError> {
        agent::call(socket, request, timeout)
    }

    fn defer(&self, socket: &Path, request: &Request) -> std::io::Result<PathBuf> {
        agent::defer(socket, request)
    }
}

/// What one invocation produced: the stdout text and the exit code.
#[derive(Debug, PartialEq, Eq)]
pub struct Invocation {
    /// What goes to stdout (the result, version info, or the error JSON).
    pub stdout: String,
    /// The process exit code.
    pub exit_code: i32,
}

/// Runs one invocation.
pub fn run(var: impl Fn(&str) -> Option<String>, stdin: &[u8], client: &dyn AgentClient) -> Invocation {
    let fail = |e: CniError, version: &str| Invocation { stdout: e.to_json(version), exit_code: 1 };
    let env = match CniEnv::from_vars(&var) {
        Ok(e) => e,
        Err(e) => {
            Logger::new(Level::Error, None).log(Level::Error, &e.to_string());
            return fail(e, &config::best_effort_version(stdin));
        }
    };
    if env.command == Command::Version {
        let v = config::best_effort_version(stdin);
        return Invocation { stdout: result::version_info(&v, config::SUPPORTED_VERSIONS).to_string(), exit_code: 0 };
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => {
            Logger::new(Level::Error, None).log(Level::Error, &format!("{:?}: {e}", env.command));
            return fail(e, &config::best_effort_version(stdin));
        }
    };
    let log_file = conf.log_file.clone().unwrap_or_else(|| std::path::PathBuf::from(config::DEFAULT_LOG_FILE));
    let mut log = Logger::new(Level::parse(conf.log_level.as_deref()), Some(&log_file));
    let pod_desc = env.pod.as_ref().map(|p| format!(" pod={}/{}", p.namespace, p.name)).unwrap_or_default();
    log.set_context(format!("cmd={:?} container={}{} ", env.command, short(&env.container_id), pod_desc));

    match dispatch(&env, &conf, client, &mut log) {
        Ok(stdout) => Invocation { stdout, exit_code: 0 },
        Err(e) => {
            log.log(Level::Error, &e.to_string());
            fail(e, &conf.cni_version)
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn dispatch(env: &CniEnv, conf: &NetConf, client: &dyn AgentClient, log: &mut Logger) -> Result<String, CniError> {
    let ok_empty = String::new();
    match env.command {
        Command::Version => unreachable!("handled before the config is parsed"),
        Command::Add => {
            let out = result::passthrough(conf.prev_result.as_ref(), &conf.cni_version).to_string();
            let Some(pod) = &env.pod else {
                log.log(Level::Debug, "not a Kubernetes pod (no K8S_POD_* in CNI_ARGS): passing through");
                return Ok(out);
            };
            if conf.bypasses(&pod.namespace, &pod.name) {
                log.log(Level::Debug, "excluded namespace or agent pod: passing through");
                return Ok(out);
            }
            let req = request(env, cni_api::Command::Add, result::pod_addresses(conf.prev_result.as_ref())?);
            match ask(client, conf, &req)? {
                Outcome::Enrolled => log.log(Level::Info, "enrolled: traffic captured, ztunnel serving"),
                _ => log.log(Level::Debug, "not enrolled"),
            }
            Ok(out)
        }
        Command::Del => {
            if env.pod.as_ref().is_some_and(|p| conf.bypasses(&p.namespace, &p.name)) {
                return Ok(ok_empty);
            }
            let req = request(env, cni_api::Command::Del, Vec::new());
            match client.call(&conf.agent_socket, &req, conf.agent_timeout()) {
                Ok(resp) => resp.into_result().map(|_| ()).map_err(|e| api_error(conf, e))?,
                // DEL must not block pod removal on an absent agent. The DEL is left beside the agent's socket
                // for it to carry out when it is back (a netns the runtime keeps would otherwise stay captured);
                // a pod whose netns is gone is dropped by the agent anyway.
                Err(agent::AgentError::Unreachable(e)) => {
                    let left = match client.defer(&conf.agent_socket, &req) {
                        Ok(file) => format!("the DEL is left for it in {}", file.display()),
                        Err(d) => {
                            format!("the DEL could not be left for it ({d}); it drops the pod once its netns is gone")
                        }
                    };
                    log.log(
                        Level::Warn,
                        &format!("agent not reachable at {} ({e}); {left}", conf.agent_socket.display()),
                    )
                }
                Err(e) => return Err(CniError::new(code::TRY_AGAIN_LATER, e.describe(&conf.agent_socket))),
            }
            Ok(ok_empty)
        }
        Command::Check => {
            let Some(pod) = &env.pod else { return Ok(ok_empty) };
            if conf.bypasses(&pod.namespace, &pod.name) {
                return Ok(ok_empty);
            }
            let req = request(env, cni_api::Command::Check, result::pod_addresses(conf.prev_result.as_ref())?);
            ask(client, conf, &req)?;
            Ok(ok_empty)
        }
        Command::Status => {
            let req = request(env, cni_api::Command::Status, Vec::new());
            match ask(client, conf, &req) {
                Ok(_) => Ok(ok_empty),
                Err(e) if conf.report_status => {
                    Err(CniError::new(code::PLUGIN_NOT_AVAILABLE, "the Ambit node agent is not ready")
                        .with_details(e.msg))
                }
                Err(e) => {
                    log.log(Level::Warn, &format!("agent not ready ({e}); not reported because report_status is off"));
                    Ok(ok_empty)
                }
            }
        }
        Command::Gc => {
            let mut req = request(env, cni_api::Command::Gc, Vec::new());
            req.valid_attachments = valid_attachments(conf)?;
            ask(client, conf, &req)?;
            Ok(ok_empty)
        }
    }
}

fn request(env: &CniEnv, command: cni_api::Command, ips: Vec<String>) -> Request {
    Request {
        version: cni_api::API_VERSION,
        command,
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ifname: env.ifname.clone(),
        pod: env.pod.clone().unwrap_or_default(),
        ips,
        valid_attachments: Vec::new(),
    }
}

fn ask(client: &dyn AgentClient, conf: &NetConf, req: &Request) -> Result<Outcome, CniError> {
    let resp = client
        .call(&conf.agent_socket, req, conf.agent_timeout())
        .map_err(|e| CniError::new(code::TRY_AGAIN_LATER, e.describe(&conf.agent_socket)))?;
    resp.into_result().map_err(|e| api_error(conf, e))
}

fn api_error(conf: &NetConf, e: cni_api::ApiError) -> CniError {
    let c = match e.code {
        ErrorCode::BadRequest => code::INVALID_CONFIG,
        ErrorCode::UnsupportedVersion => code::INCOMPATIBLE_VERSION,
        ErrorCode::InvalidNetns => code::INVALID_NETNS,
        ErrorCode::TryAgainLater => code::TRY_AGAIN_LATER,
        ErrorCode::Internal => code::ENROLMENT_FAILED,
    };
    CniError::new(c, format!("Ambit node agent ({}): {}", conf.agent_socket.display(), e.message))
}

fn valid_attachments(conf: &NetConf) -> Result<Vec<Attachment>, CniError> {
    let mut out = Vec::new();
    for a in conf.valid_attachments.iter().flatten() {
        let id = a.get("containerID").and_then(Value::as_str);
        let ifname = a.get("ifname").and_then(Value::as_str);
        match (id, ifname) {
            (Some(id), Some(ifname)) => out.push(Attachment { container_id: id.into(), ifname: ifname.into() }),
            _ => {
                return Err(CniError::new(
                    code::INVALID_CONFIG,
                    "cni.dev/valid-attachments entries need containerID and ifname",
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
