//! The policy routing half of the in-pod rules (netlink), run on a thread inside the pod netns.
//!
//! `ip rule add fwmark 0x111/0xfff pref 32764 lookup 100` and `ip route add local default dev lo table 100`, for
//! each address family the pod has. Adding is idempotent (an existing identical rule or route is kept) and
//! removing tolerates their absence.

use std::net::{Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::route::{RouteMessage, RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::{CONNMARK, InpodConfig, MARK_MASK, ROUTE_TABLE, RULE_PRIORITY};

/// Why routing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// A netlink request failed.
    #[error("netlink: {what}: {source}")]
    Netlink {
        /// Which request.
        what: String,
        /// The cause.
        source: rtnetlink::Error,
    },
    /// The netlink socket or its runtime could not be created.
    #[error("cannot open netlink in the pod netns: {0}")]
    Io(#[from] std::io::Error),
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn rule_message(family: AddressFamily) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = family;
    m.header.table = ROUTE_TABLE as u8;
    m.header.action = RuleAction::ToTable;
    m.attributes.push(RuleAttribute::FwMark(CONNMARK));
    m.attributes.push(RuleAttribute::FwMask(MARK_MASK));
    m.attributes.push(RuleAttribute::Priority(RULE_PRIORITY));
    m
}

fn route_messages(cfg: InpodConfig, lo: u32) -> Vec<(RouteMessage, &'static str)> {
    let mut v = Vec::new();
    if cfg.ipv4 {
        let m = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(lo)
            .table_id(ROUTE_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build();
        v.push((m, "local 0.0.0.0/0 dev lo table 100"));
    }
    if cfg.ipv6 {
        let m = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .output_interface(lo)
            .table_id(ROUTE_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build();
        v.push((m, "local ::/0 dev lo table 100"));
    }
    v
}

fn rule_families(cfg: InpodConfig) -> Vec<AddressFamily> {
    let mut v = Vec::new();
    if cfg.ipv4 {
        v.push(AddressFamily::Inet);
    }
    if cfg.ipv6 {
        v.push(AddressFamily::Inet6);
    }
    v
}

/// Runs `f` with a netlink handle bound to the calling thread's netns.
fn with_netlink<F, Fut, T>(f: F) -> Result<T, RoutingError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T, RoutingError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    rt.block_on(async move {
        // The socket is created here, so it belongs to this thread's (the pod's) netns.
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(conn);
        let res = f(handle).await;
        task.abort();
        res
    })
}

async fn loopback_index(handle: &Handle) -> Result<u32, RoutingError> {
    let mut links = handle.link().get().match_name("lo".to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(l.header.index),
        Ok(None) => Err(RoutingError::Io(std::io::Error::other("the pod netns has no lo interface"))),
        Err(e) => Err(RoutingError::Netlink { what: "find lo".into(), source: e }),
    }
}

/// Installs the rule and routes (idempotent).
pub fn install(cfg: InpodConfig) -> Result<(), RoutingError> {
    with_netlink(|handle| async move {
        let lo = loopback_index(&handle).await?;
        for (route, what) in route_messages(cfg, lo) {
            handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(|e| RoutingError::Netlink { what: format!("add route {what}"), source: e })?;
        }
        for fam in rule_families(cfg) {
            let mut req = handle.rule().add();
            *req.message_mut() = rule_message(fam);
            match req.execute().await {
                Ok(()) => {}
                // The same rule is already there (NLM_F_EXCL): nothing to do.
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(RoutingError::Netlink {
                        what: format!("add rule fwmark {CONNMARK:#x}/{MARK_MASK:#x}"),
                        source: e,
                    });
                }
            }
        }
        Ok(())
    })
}

/// Removes the rule and routes; absent ones are fine.
pub fn remove(cfg: InpodConfig) -> Result<(), RoutingError> {
    with_netlink(|handle| async move {
        for fam in rule_families(cfg) {
            // Delete every copy, in case something added duplicates.
            loop {
                match handle.rule().del(rule_message(fam)).execute().await {
                    Ok(()) => continue,
                    Err(e) if errno(&e) == Some(libc::ENOENT) => break,
                    Err(e) => return Err(RoutingError::Netlink { what: "delete rule".into(), source: e }),
                }
            }
        }
        let lo = match loopback_index(&handle).await {
            Ok(lo) => lo,
            Err(_) => return Ok(()),
        };
        for (route, what) in route_messages(cfg, lo) {
            match handle.route().del(route).execute().await {
                Ok(()) => {}
                Err(e) if matches!(errno(&e), Some(libc::ESRCH) | Some(libc::ENOENT)) => {}
                Err(e) => return Err(RoutingError::Netlink { what: format!("delete route {what}"), source: e }),
            }
        }
        Ok(())
    })
}

/// Whether the rule and the routes are all present (for CHECK).
pub fn present(cfg: InpodConfig) -> Result<bool, RoutingError> {
    with_netlink(|handle| async move {
        for fam in rule_families(cfg) {
            let version = if fam == AddressFamily::Inet { rtnetlink::IpVersion::V4 } else { rtnetlink::IpVersion::V6 };
            let rules: Vec<RuleMessage> = handle
                .rule()
                .get(version)
                .execute()
                .try_collect()
                .await
                .map_err(|e| RoutingError::Netlink { what: "list rules".into(), source: e })?;
            let want = rule_message(fam);
            let found = rules.iter().any(|r| {
                r.header.table == want.header.table && want.attributes.iter().all(|a| r.attributes.contains(a))
            });
            if !found {
                return Ok(false);
            }
        }
        Ok(true)
    })
}

/// The addresses on the calling thread's netns's interfaces (to tell a pod's netns by its IP).
pub fn addresses() -> Result<Vec<std::net::IpAddr>, RoutingError> {
    use rtnetlink::packet_route::address::AddressAttribute;
    with_netlink(|handle| async move {
        let msgs: Vec<_> = handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| RoutingError::Netlink { what: "list addresses".into(), source: e })?;
        Ok(msgs
            .into_iter()
            .flat_map(|m| m.attributes.into_iter())
            .filter_map(|a| match a {
                AddressAttribute::Address(ip) => Some(ip),
                _ => None,
            })
            .collect())
    })
}
