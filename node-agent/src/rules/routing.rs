//! The policy routing half of the in-pod rules (netlink), run on a thread inside the pod netns.
//!
//! For each address family the pod has: `ip rule add fwmark 0x111/0xfff pref 32764 lookup 100` with
//! `ip route add local default dev lo table 100` (ztunnel's connections' replies), and
//! `ip rule add fwmark 0/0xfff ipproto tcp pref 32765 lookup 101` with `ip route add default dev lo table 101`
//! (the app's TCP through `lo`, see [`super`]). Adding is idempotent (an existing identical rule or route is
//! kept) and removing tolerates their absence.

use std::net::{Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::IpProtocol;
use rtnetlink::packet_route::route::{RouteMessage, RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::{CONNMARK, InpodConfig, LOOPBACK_RULE_PRIORITY, LOOPBACK_TABLE, MARK_MASK, ROUTE_TABLE, RULE_PRIORITY};

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

/// The pod's routing rules of one family, each with what `ip rule` would show of it.
fn rule_messages(family: AddressFamily) -> [(RuleMessage, String); 2] {
    let rule = |table: u32, mark: u32, priority: u32| {
        let mut m = RuleMessage::default();
        m.header.family = family;
        m.header.table = table as u8;
        m.header.action = RuleAction::ToTable;
        m.attributes.push(RuleAttribute::FwMark(mark));
        m.attributes.push(RuleAttribute::FwMask(MARK_MASK));
        m.attributes.push(RuleAttribute::Priority(priority));
        m
    };
    let replies = rule(ROUTE_TABLE, CONNMARK, RULE_PRIORITY);
    let mut app = rule(LOOPBACK_TABLE, 0, LOOPBACK_RULE_PRIORITY);
    app.attributes.push(RuleAttribute::IpProtocol(IpProtocol::Tcp));
    [
        (replies, format!("fwmark {CONNMARK:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE}")),
        (app, format!("fwmark 0/{MARK_MASK:#x} ipproto tcp lookup {LOOPBACK_TABLE}")),
    ]
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
        // No source: the kernel picks the pod's address, as for the pod's own default route.
        let m = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .output_interface(lo)
            .table_id(LOOPBACK_TABLE)
            .scope(RouteScope::Link)
            .build();
        v.push((m, "0.0.0.0/0 dev lo table 101"));
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
        let m = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .output_interface(lo)
            .table_id(LOOPBACK_TABLE)
            .build();
        v.push((m, "::/0 dev lo table 101"));
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

/// Installs the rules and routes (idempotent).
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
            for (rule, what) in rule_messages(fam) {
                let mut req = handle.rule().add();
                *req.message_mut() = rule;
                match req.execute().await {
                    Ok(()) => {}
                    // The same rule is already there (NLM_F_EXCL): nothing to do.
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    Err(e) => return Err(RoutingError::Netlink { what: format!("add rule {what}"), source: e }),
                }
            }
        }
        Ok(())
    })
}

/// Removes the rules and routes; absent ones are fine.
pub fn remove(cfg: InpodConfig) -> Result<(), RoutingError> {
    with_netlink(|handle| async move {
        for fam in rule_families(cfg) {
            for (rule, what) in rule_messages(fam) {
                // Delete every copy, in case something added duplicates.
                loop {
                    match handle.rule().del(rule.clone()).execute().await {
                        Ok(()) => continue,
                        Err(e) if errno(&e) == Some(libc::ENOENT) => break,
                        Err(e) => return Err(RoutingError::Netlink { what: format!("delete rule {what}"), source: e }),
                    }
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

/// Whether the rules are all present (for CHECK).
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
            for (want, _) in rule_messages(fam) {
                // The kernel leaves a mark of 0 out of its dump: a mask without a mark is that.
                let found = rules.iter().any(|r| {
                    r.header.table == want.header.table
                        && want
                            .attributes
                            .iter()
                            .filter(|a| **a != RuleAttribute::FwMark(0))
                            .all(|a| r.attributes.contains(a))
                });
                if !found {
                    return Ok(false);
                }
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
