//! The policy routing half of the in-pod rules (netlink), run on a thread inside the pod netns.
//!
//! For each address family the pod has: `ip rule add fwmark 0x111/0xfff pref 32764 lookup 100` with
//! `ip route add local default dev lo table 100` (ztunnel's connections' replies), and
//! `ip rule add fwmark 0/0xfff ipproto tcp pref 32765 lookup 101` with `ip route add default dev lo table 101`
//! (the app's TCP through `lo`, see [`super`]; the agent's `loopbackRoute: false` leaves these two out). Adding
//! is idempotent (an existing identical rule or route is kept) and removing tolerates their absence.

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

/// One of the pod's routing rules.
struct PodRule {
    msg: RuleMessage,
    /// What `ip rule` shows of it.
    what: String,
}

/// Whether `cfg` wants the rules and routes of routing table `table`: all but the loopback route's, which only
/// with [`InpodConfig::loopback_route`].
fn wanted(cfg: InpodConfig, table: u8) -> bool {
    u32::from(table) != LOOPBACK_TABLE || cfg.loopback_route
}

/// The pod's routing rules of one family, all of them (whether `cfg` wants the loopback route or not).
fn rule_messages(family: AddressFamily) -> [PodRule; 2] {
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
        PodRule { msg: replies, what: format!("fwmark {CONNMARK:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE}") },
        PodRule { msg: app, what: format!("fwmark 0/{MARK_MASK:#x} ipproto tcp lookup {LOOPBACK_TABLE}") },
    ]
}

/// The pod's routing rules as `cfg` wants them, as `ip rule` would show them (each family has the same), for
/// messages: "fwmark 0x111/0xfff lookup 100 and fwmark 0/0xfff ipproto tcp lookup 101", or with the loopback
/// route off, the first and "without" the second.
pub fn describe(cfg: InpodConfig) -> String {
    let [replies, app] = rule_messages(AddressFamily::Inet);
    if cfg.loopback_route {
        format!("{} and {}", replies.what, app.what)
    } else {
        format!("{} without {} (loopbackRoute: false)", replies.what, app.what)
    }
}

/// The pod's routes, all of them (whether `cfg` wants the loopback route or not), each with what `ip route`
/// shows of it.
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

/// Deletes every copy of `rule` (in case something added duplicates); absent is fine.
async fn delete_rule(handle: &Handle, rule: &PodRule) -> Result<(), RoutingError> {
    loop {
        match handle.rule().del(rule.msg.clone()).execute().await {
            Ok(()) => continue,
            Err(e) if errno(&e) == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(RoutingError::Netlink { what: format!("delete rule {}", rule.what), source: e }),
        }
    }
}

/// Deletes a route; absent is fine.
async fn delete_route(handle: &Handle, route: RouteMessage, what: &str) -> Result<(), RoutingError> {
    match handle.route().del(route).execute().await {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(libc::ESRCH) | Some(libc::ENOENT)) => Ok(()),
        Err(e) => Err(RoutingError::Netlink { what: format!("delete route {what}"), source: e }),
    }
}

/// Installs the rules and routes `cfg` wants (idempotent). With the loopback route off, takes out the loopback
/// route's rule and route if an agent with it on left them, so that switching it off takes effect when the
/// agent re-applies a pod's rules (at its start, or on repair).
pub fn install(cfg: InpodConfig) -> Result<(), RoutingError> {
    with_netlink(|handle| async move {
        let lo = loopback_index(&handle).await?;
        for (route, what) in route_messages(cfg, lo) {
            if !wanted(cfg, route.header.table) {
                continue;
            }
            handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(|e| RoutingError::Netlink { what: format!("add route {what}"), source: e })?;
        }
        for fam in rule_families(cfg) {
            for rule in rule_messages(fam) {
                if !wanted(cfg, rule.msg.header.table) {
                    delete_rule(&handle, &rule).await?;
                    continue;
                }
                let mut req = handle.rule().add();
                *req.message_mut() = rule.msg;
                match req.execute().await {
                    Ok(()) => {}
                    // The same rule is already there (NLM_F_EXCL): nothing to do.
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    Err(e) => return Err(RoutingError::Netlink { what: format!("add rule {}", rule.what), source: e }),
                }
            }
        }
        for (route, what) in route_messages(cfg, lo).into_iter().filter(|(r, _)| !wanted(cfg, r.header.table)) {
            delete_route(&handle, route, what).await?;
        }
        Ok(())
    })
}

/// Removes the rules and routes, the loopback route's too whatever `cfg` says of it; absent ones are fine.
pub fn remove(cfg: InpodConfig) -> Result<(), RoutingError> {
    with_netlink(|handle| async move {
        for fam in rule_families(cfg) {
            for rule in rule_messages(fam) {
                delete_rule(&handle, &rule).await?;
            }
        }
        let lo = match loopback_index(&handle).await {
            Ok(lo) => lo,
            Err(_) => return Ok(()),
        };
        for (route, what) in route_messages(cfg, lo) {
            delete_route(&handle, route, what).await?;
        }
        Ok(())
    })
}

/// Whether the rules are as `cfg` wants them (for CHECK): all of its rules present, and with the loopback
/// route off, that route's rule absent.
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
            for want in rule_messages(fam) {
                // The kernel leaves a mark of 0 out of its dump: a mask without a mark is that.
                let found = rules.iter().any(|r| {
                    r.header.table == want.msg.header.table
                        && want
                            .msg
                            .attributes
                            .iter()
                            .filter(|a| **a != RuleAttribute::FwMark(0))
                            .all(|a| r.attributes.contains(a))
                });
                if found != wanted(cfg, want.msg.header.table) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_follows_the_setting_and_the_rules() {
        let on = InpodConfig { ipv4: true, ipv6: false, loopback_route: true };
        assert_eq!(describe(on), "fwmark 0x111/0xfff lookup 100 and fwmark 0/0xfff ipproto tcp lookup 101");
        assert_eq!(
            describe(on.with_loopback_route(false)),
            "fwmark 0x111/0xfff lookup 100 without fwmark 0/0xfff ipproto tcp lookup 101 (loopbackRoute: false)"
        );
        // With the route off, exactly the loopback route's rule of each family and its route of each family are
        // unwanted (the tables are read from the messages' headers).
        let off = InpodConfig { ipv4: true, ipv6: true, loopback_route: false };
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let rules = rule_messages(fam);
            let unwanted: Vec<&str> =
                rules.iter().filter(|r| !wanted(off, r.msg.header.table)).map(|r| r.what.as_str()).collect();
            assert_eq!(unwanted, ["fwmark 0/0xfff ipproto tcp lookup 101"]);
            assert!(
                rules
                    .iter()
                    .all(|r| r.msg.header.family == fam && wanted(off.with_loopback_route(true), r.msg.header.table))
            );
        }
        let unwanted: Vec<&str> =
            route_messages(off, 1).into_iter().filter(|(r, _)| !wanted(off, r.header.table)).map(|(_, w)| w).collect();
        assert_eq!(unwanted, ["0.0.0.0/0 dev lo table 101", "::/0 dev lo table 101"]);
    }
}
