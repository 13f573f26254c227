//! Where a captured outbound connection goes, decided from the mesh's state alone (no sockets): Istio
//! ztunnel's rules, waypoints included.
//!
//! - To a service VIP: through the service's waypoint if it has one (HBONE to the waypoint, CONNECT to the
//!   VIP and port the app asked for), else to one of its endpoints on this network, port mapped.
//! - To a workload's address: through the workload's waypoint if it has one, unless the connection comes
//!   from that waypoint itself (its identity and its address), else to the workload.
//! - HBONE to a mesh workload, plain TCP to anything else.
//!
//! A waypoint that cannot be resolved, and an endpoint only a network gateway could reach, refuse the
//! connection: traffic that must pass a waypoint is never sent around it, and never in plaintext.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tracing::debug;

use crate::identity::Identity;
use crate::metrics::Peer;
use crate::state::{NoUpstream, Protocol, ResolvedWaypoint, Service, Snapshot, WaypointError, Workload};

/// Where an outbound connection goes.
#[derive(Debug)]
pub enum Route {
    /// HBONE to `tunnel` (a mesh workload's or a waypoint's HBONE port) with CONNECT `authority`; the peer
    /// must prove one of `expected`.
    Hbone {
        /// Where the HBONE connection goes.
        tunnel: SocketAddr,
        /// The CONNECT target: the workload's address and port, or for a waypoint the destination the app
        /// asked for (a service's VIP and port).
        authority: SocketAddr,
        /// Who is at the other end, for metrics: the workload, or the waypoint (and the service asked for).
        dst: Peer,
        /// The identities the peer may prove.
        expected: Vec<Identity>,
        /// Through a waypoint.
        waypoint: bool,
    },
    /// Plain TCP to `target` (outside the mesh, or a workload that does not speak HBONE).
    Passthrough {
        /// Where to.
        target: SocketAddr,
        /// Who, as far as is known.
        dst: Peer,
    },
}

/// Why a connection is refused before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// A service with no usable endpoint.
    #[error(transparent)]
    NoUpstream(#[from] NoUpstream),
    /// A waypoint that must be passed and cannot be.
    #[error(transparent)]
    Waypoint(#[from] WaypointError),
}

/// A refused connection: why, and what is known of where it was going (for metrics).
#[derive(Debug)]
pub struct Refusal {
    /// Why.
    pub error: RouteError,
    /// The destination, as far as it was resolved.
    pub dst: Peer,
}

/// The connection's source: the pod whose app opened it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// Its workload entry, when the mesh has one.
    pub workload: Option<&'a Workload>,
    /// Its identity.
    pub identity: &'a Identity,
    /// The app's address.
    pub ip: IpAddr,
    /// This node's network (ztunnel's `NETWORK`); the workload's own, when it has one, wins.
    pub network: &'a str,
}

/// Decides where a connection from `src` to `dst` goes.
pub fn route(snap: &Snapshot, td: &str, src: Source<'_>, dst: SocketAddr) -> Result<Route, Box<Refusal>> {
    let network = src.workload.map_or(src.network, |w| w.network.as_str());
    if let Some(svc) = snap.service_by_vip(dst.ip()) {
        let refused = |error: RouteError, svc: &Arc<Service>| {
            Box::new(Refusal { error, dst: Peer { workload: None, identity: None, service: Some(svc.clone()) } })
        };
        if let Some(gw) = snap.service_waypoint(&svc) {
            let wp = snap.waypoint(gw, network, dst).map_err(|e| refused(e.into(), &svc))?;
            debug!(service = %svc.key(), waypoint = %gw, via = %wp.addr, "service-addressed: through its waypoint");
            return Ok(through_waypoint(wp, dst, Some(svc), td));
        }
        let up = snap.pick_upstream(&svc, dst.ip(), dst.port(), network).map_err(|e| refused(e.into(), &svc))?;
        // Addressed to a service that has no waypoint: a waypoint of the chosen endpoint is not consulted.
        return Ok(direct(up.workload, up.addr, Some(svc), td));
    }
    // A workload on another network is not this address's owner here (addresses are per network).
    let Some(w) = snap.workload_by_ip(dst.ip()).filter(|w| w.network == network) else {
        return Ok(Route::Passthrough { target: dst, dst: Peer::default() });
    };
    if let Some(gw) = &w.waypoint {
        if snap.is_from_waypoint(gw, src.identity, src.ip, td) {
            debug!(workload = %w.uid, waypoint = %gw, "from the workload's own waypoint: straight to the workload");
        } else {
            let wp = snap.waypoint(gw, network, dst).map_err(|e| {
                Box::new(Refusal {
                    error: e.into(),
                    dst: Peer { workload: Some(w.clone()), identity: None, service: None },
                })
            })?;
            debug!(workload = %w.uid, waypoint = %gw, via = %wp.addr, "workload-addressed: through its waypoint");
            return Ok(through_waypoint(wp, dst, None, td));
        }
    }
    Ok(direct(w, dst, None, td))
}

/// HBONE to a waypoint, CONNECT to what the app asked for; the waypoint proves its workload's identity or
/// one of its service's SANs.
fn through_waypoint(wp: ResolvedWaypoint, authority: SocketAddr, service: Option<Arc<Service>>, td: &str) -> Route {
    let id = wp.workload.identity(td);
    let expected = expected(id.clone(), wp.service.as_deref());
    Route::Hbone {
        tunnel: wp.addr,
        authority,
        dst: Peer { workload: Some(wp.workload), identity: Some(id), service },
        expected,
        waypoint: true,
    }
}

/// To the workload itself: HBONE on its port 15008 if it is in the mesh, else plain TCP.
fn direct(w: Arc<Workload>, target: SocketAddr, service: Option<Arc<Service>>, td: &str) -> Route {
    if w.protocol != Protocol::HBONE {
        return Route::Passthrough { target, dst: Peer { workload: Some(w), identity: None, service } };
    }
    let id = w.identity(td);
    let expected = expected(id.clone(), service.as_deref());
    Route::Hbone {
        tunnel: SocketAddr::new(target.ip(), ambit_proto::zds::INBOUND_HBONE_PORT),
        authority: target,
        dst: Peer { workload: Some(w), identity: Some(id), service },
        expected,
        waypoint: false,
    }
}

/// The workload's identity and the service's SANs that are workload identities, sorted, without repeats.
fn expected(id: Identity, service: Option<&Service>) -> Vec<Identity> {
    let mut expected = vec![id];
    for san in service.iter().flat_map(|s| &s.subject_alt_names) {
        match san.parse::<Identity>() {
            Ok(i) => expected.push(i),
            Err(e) => debug!(error = %e, "ignoring a service SAN that is not a workload identity"),
        }
    }
    expected.sort();
    expected.dedup();
    expected
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::LocalConfig;

    const TD: &str = "cluster.local";

    /// A client, a server behind a service, and a waypoint (a workload behind its own service), on one
    /// network; `extra` is appended to the server's workload and `svc_extra` to its service.
    fn mesh(extra: &str, svc_extra: &str) -> Snapshot {
        let text = format!(
            r#"
workloads:
- {{uid: c, name: client, namespace: app, serviceAccount: client, workloadIps: [10.0.0.1, "fd00::1"], protocol: HBONE}}
- {{uid: s, name: server, namespace: app, serviceAccount: server, workloadIps: [10.0.0.2, "fd00::2"], protocol: HBONE,
   services: {{"app/server.app.svc.cluster.local": {{}}}}{extra}}}
- {{uid: w, name: waypoint, namespace: app, serviceAccount: waypoint, workloadIps: [10.0.0.9, "fd00::9"],
   protocol: HBONE, services: {{"app/waypoint.app.svc.cluster.local": {{15008: 15008}}}}}}
services:
- {{name: server, namespace: app, hostname: server.app.svc.cluster.local, vips: [/10.96.0.2, "/fd96::2"],
   ports: {{80: 8080}}{svc_extra}}}
- {{name: waypoint, namespace: app, hostname: waypoint.app.svc.cluster.local, vips: [/10.96.0.9],
   ports: {{15008: 15008, 15021: 15021}}, subjectAltNames: ["spiffe://cluster.local/ns/app/sa/waypoint-canary"]}}
"#
        );
        Snapshot::new(LocalConfig::parse(&text).unwrap())
    }

    fn go(snap: &Snapshot, src_uid: &str, src_ip: &str, sa: &str, dst: &str) -> Result<Route, Box<Refusal>> {
        let id = Identity::new(TD, "app", sa);
        let w = snap.workloads.iter().find(|w| w.uid == src_uid).cloned();
        let src = Source { workload: w.as_deref(), identity: &id, ip: src_ip.parse().unwrap(), network: "" };
        route(snap, TD, src, dst.parse().unwrap())
    }

    fn hbone(r: Result<Route, Box<Refusal>>) -> (SocketAddr, SocketAddr, Peer, Vec<String>, bool) {
        match r {
            Ok(Route::Hbone { tunnel, authority, dst, expected, waypoint }) => {
                (tunnel, authority, dst, expected.iter().map(|i| i.to_string()).collect(), waypoint)
            }
            Ok(other) => panic!("not HBONE: {other:?}"),
            Err(e) => panic!("refused: {}", e.error),
        }
    }

    const BY_HOST: &str = r#", waypoint: {destination: "app/waypoint.app.svc.cluster.local", hboneMtlsPort: 15008}"#;
    const BY_IP: &str = r#", waypoint: {destination: "/10.0.0.9", hboneMtlsPort: 15008}"#;
    const BY_VIP: &str = r#", waypoint: {destination: "/10.96.0.9", hboneMtlsPort: 15008}"#;

    #[test]
    fn without_waypoints_a_service_goes_to_an_endpoint_and_a_workload_to_itself() {
        let snap = mesh("", "");
        let (tunnel, authority, dst, expected, waypoint) = hbone(go(&snap, "c", "10.0.0.1", "client", "10.96.0.2:80"));
        assert_eq!((tunnel, authority), ("10.0.0.2:15008".parse().unwrap(), "10.0.0.2:8080".parse().unwrap()));
        assert_eq!(dst.workload.unwrap().uid, "s");
        assert_eq!(expected, ["spiffe://cluster.local/ns/app/sa/server"]);
        assert!(!waypoint);
        let (tunnel, authority, ..) = hbone(go(&snap, "c", "10.0.0.1", "client", "10.0.0.2:8080"));
        assert_eq!((tunnel, authority), ("10.0.0.2:15008".parse().unwrap(), "10.0.0.2:8080".parse().unwrap()));
        assert!(matches!(go(&snap, "c", "10.0.0.1", "client", "192.0.2.1:80"), Ok(Route::Passthrough { .. })));
    }

    #[test]
    fn a_service_waypoint_takes_service_addressed_traffic_with_the_vip_as_connect_target() {
        for (how, gw) in [("hostname", BY_HOST), ("pod address", BY_IP), ("service VIP", BY_VIP)] {
            let snap = mesh("", gw);
            let (tunnel, authority, dst, expected, waypoint) =
                hbone(go(&snap, "c", "10.0.0.1", "client", "10.96.0.2:80"));
            assert_eq!(tunnel, "10.0.0.9:15008".parse().unwrap(), "{how}");
            assert_eq!(authority, "10.96.0.2:80".parse().unwrap(), "{how}: the VIP and port, untranslated");
            assert!(waypoint);
            // Metrics: the waypoint is the destination workload, the service the one the app asked for.
            assert_eq!(dst.workload.unwrap().uid, "w", "{how}");
            assert_eq!(dst.identity.unwrap().to_string(), "spiffe://cluster.local/ns/app/sa/waypoint");
            assert_eq!(dst.service.unwrap().name, "server");
            let mut want = vec!["spiffe://cluster.local/ns/app/sa/waypoint"];
            if how != "pod address" {
                // Named through its service: the service's SANs are identities the waypoint may prove too.
                want.push("spiffe://cluster.local/ns/app/sa/waypoint-canary");
            }
            assert_eq!(expected, want, "{how}");
            // Workload-addressed traffic to the same server does not pass a service's waypoint.
            assert!(!hbone(go(&snap, "c", "10.0.0.1", "client", "10.0.0.2:8080")).4, "{how}");
        }
        // Over IPv6, a waypoint named by hostname is reached in the app's family.
        let snap = mesh("", BY_HOST);
        let (tunnel, authority, ..) = hbone(go(&snap, "c", "fd00::1", "client", "[fd96::2]:80"));
        assert_eq!((tunnel, authority), ("[fd00::9]:15008".parse().unwrap(), "[fd96::2]:80".parse().unwrap()));
    }

    #[test]
    fn a_workload_waypoint_takes_workload_addressed_traffic_except_from_the_waypoint_itself() {
        let snap = mesh(BY_HOST, "");
        let (tunnel, authority, dst, expected, waypoint) = hbone(go(&snap, "c", "10.0.0.1", "client", "10.0.0.2:8080"));
        assert_eq!((tunnel, authority), ("10.0.0.9:15008".parse().unwrap(), "10.0.0.2:8080".parse().unwrap()));
        assert!(waypoint);
        assert!(dst.service.is_none(), "workload-addressed: no service");
        assert!(expected.contains(&"spiffe://cluster.local/ns/app/sa/waypoint".to_string()));
        // The waypoint's own connection to the workload goes straight there: never looped back to it.
        let (tunnel, _, dst, ..) = hbone(go(&snap, "w", "10.0.0.9", "waypoint", "10.0.0.2:8080"));
        assert_eq!(tunnel, "10.0.0.2:15008".parse().unwrap());
        assert_eq!(dst.workload.unwrap().uid, "s");
        // Both must be the waypoint's: its identity from another address, or another identity from its
        // address, is not the waypoint.
        assert!(hbone(go(&snap, "c", "10.0.0.1", "waypoint", "10.0.0.2:8080")).4, "the identity alone");
        assert!(hbone(go(&snap, "w", "10.0.0.9", "client", "10.0.0.2:8080")).4, "the address alone");
        // Service-addressed traffic to it does not pass the workload's waypoint (Istio: it would have taken a
        // service waypoint, had the service one).
        assert!(!hbone(go(&snap, "c", "10.0.0.1", "client", "10.96.0.2:80")).4);
    }

    #[test]
    fn a_waypoint_that_cannot_be_resolved_refuses_the_connection() {
        let cases = [
            (r#", waypoint: {destination: "app/nowhere.app.svc.cluster.local", hboneMtlsPort: 15008}"#, "not a"),
            (r#", waypoint: {destination: "/10.0.0.77", hboneMtlsPort: 15008}"#, "not a"),
            (r#", waypoint: {destination: "other/waypoint.app.svc.cluster.local", hboneMtlsPort: 15008}"#, "not a"),
            (r#", waypoint: {destination: "app/server.app.svc.cluster.local", hboneMtlsPort: 15008}"#, ""),
        ];
        for (gw, why) in cases {
            for (extra, svc_extra, dst) in [("", gw, "10.96.0.2:80"), (gw, "", "10.0.0.2:8080")] {
                let snap = mesh(extra, svc_extra);
                match go(&snap, "c", "10.0.0.1", "client", dst) {
                    Err(r) => assert!(r.error.to_string().contains(why), "{gw} {dst}: {}", r.error),
                    Ok(Route::Hbone { dst: p, waypoint: true, .. }) if why.is_empty() => {
                        // A waypoint that names the service itself resolves to the server: the route goes there
                        // as to a waypoint (the server's ztunnel sees a CONNECT to the VIP and refuses it).
                        assert_eq!(p.workload.unwrap().uid, "s");
                    }
                    Ok(r) => panic!("{gw} {dst}: routed {r:?}"),
                }
            }
        }
    }

    #[test]
    fn a_waypoint_with_no_healthy_endpoint_or_on_another_network_refuses() {
        let text = r#"
workloads:
- {uid: s, name: server, namespace: app, workloadIps: [10.0.0.2], protocol: HBONE, services: {"app/server.app.svc": {}}}
- {uid: w, name: waypoint, namespace: app, workloadIps: [10.0.0.9], status: Unhealthy, services: {"app/wp.app.svc": {}}}
- {uid: w2, name: waypoint2, namespace: app, workloadIps: [10.1.0.9], network: remote, services: {"app/wp2.app.svc": {}}}
- {uid: r, name: remote, namespace: app, workloadIps: [10.1.0.2], network: remote, protocol: HBONE, services: {"app/far.app.svc": {}}}
services:
- {name: server, namespace: app, hostname: server.app.svc, vips: [/10.96.0.2], ports: {80: 80},
   waypoint: {destination: "app/wp.app.svc", hboneMtlsPort: 15008}}
- {name: two, namespace: app, hostname: two.app.svc, vips: [/10.96.0.3], ports: {80: 80},
   waypoint: {destination: "app/wp2.app.svc", hboneMtlsPort: 15008}}
- {name: far, namespace: app, hostname: far.app.svc, vips: [/10.96.0.4], ports: {80: 80}}
- {name: wp, namespace: app, hostname: wp.app.svc, vips: [/10.96.0.9], ports: {15008: 15008}}
- {name: wp2, namespace: app, hostname: wp2.app.svc, vips: [/10.96.1.9], ports: {15008: 15008}}
- {name: noport, namespace: app, hostname: noport.app.svc, vips: [/10.96.0.5], ports: {80: 80},
   waypoint: {destination: "app/server.app.svc", hboneMtlsPort: 15008}}
"#;
        let snap = Snapshot::new(LocalConfig::parse(text).unwrap());
        let id = Identity::new(TD, "app", "client");
        let src = Source { workload: None, identity: &id, ip: "10.0.0.1".parse().unwrap(), network: "" };
        let err = |dst: &str| route(&snap, TD, src, dst.parse().unwrap()).unwrap_err();
        let e = err("10.96.0.2:80");
        assert!(matches!(e.error, RouteError::Waypoint(WaypointError::NoEndpoint(..))), "{}", e.error);
        assert_eq!(e.dst.service.unwrap().name, "server", "counted against the service asked for");
        let e = err("10.96.0.3:80");
        assert!(matches!(e.error, RouteError::Waypoint(WaypointError::OtherNetwork(_))), "{}", e.error);
        assert!(e.error.to_string().contains("network gateway (unsupported)"), "{}", e.error);
        // A waypoint's service that does not declare its HBONE port (Istio's ztunnel finds no endpoint then).
        let e = err("10.96.0.5:80");
        assert!(matches!(e.error, RouteError::Waypoint(WaypointError::NoPort(..))), "{}", e.error);
        // Endpoints only on another network: a network gateway's job, refused rather than dialed.
        let e = err("10.96.0.4:80");
        assert!(matches!(e.error, RouteError::NoUpstream(NoUpstream::OtherNetwork(_))), "{}", e.error);
    }

    #[test]
    fn weighted_waypoints_share_connections_by_weight() {
        let weighted = r#", weightedWaypoints: [
            {destination: {destination: "/10.0.0.9", hboneMtlsPort: 15008}, weight: 3},
            {destination: {destination: "/10.0.0.2", hboneMtlsPort: 15009}, weight: 1}]"#;
        let snap = mesh("", &format!("{BY_HOST}{weighted}"));
        let tunnels: Vec<String> =
            (0..8).map(|_| hbone(go(&snap, "c", "10.0.0.1", "client", "10.96.0.2:80")).0.to_string()).collect();
        assert_eq!(tunnels.iter().filter(|t| *t == "10.0.0.9:15008").count(), 6, "{tunnels:?}");
        assert_eq!(tunnels.iter().filter(|t| *t == "10.0.0.2:15009").count(), 2, "{tunnels:?}");
        // All weights zero: the single waypoint.
        let zero = weighted.replace("weight: 3", "weight: 0").replace("weight: 1", "weight: 0");
        let snap = mesh("", &format!("{BY_IP}{zero}"));
        assert_eq!(hbone(go(&snap, "c", "10.0.0.1", "client", "10.96.0.2:80")).0, "10.0.0.9:15008".parse().unwrap());
    }
}
