//! Istio's control-plane protocols (feature `grpc`): the certificate service istiod serves on 15012
//! (`istio.v1.auth.IstioCertificateService`), delta ADS (`envoy.service.discovery.v3`), and the resources it
//! carries to ztunnels (`istio.workload.Address`, `istio.security.Authorization`). Generated from the
//! definitions in `proto/istio` and `proto/envoy`, whose packages and field numbers are Istio's.

/// `type.googleapis.com/istio.workload.Address`: workloads and services.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// `type.googleapis.com/istio.security.Authorization`: L4 policies.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

/// Istio's packages.
pub mod istio {
    /// `istio.workload`: workloads and services.
    #[allow(missing_docs, clippy::all)]
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
    }
    /// `istio.security`: authorization policies.
    #[allow(missing_docs, clippy::all)]
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
    /// `istio.v1.auth`: the certificate service.
    #[allow(missing_docs, clippy::all)]
    pub mod ca {
        include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
    }
}

/// `envoy.service.discovery.v3`: (delta) aggregated discovery.
#[allow(missing_docs, clippy::all)]
pub mod discovery {
    include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
}

#[cfg(test)]
mod tests {
    use super::discovery::{DeltaDiscoveryResponse, Resource};
    use super::istio::security::{Authorization, StringMatch, string_match::MatchType};
    use super::istio::workload::{Address, PortList, Workload, address};
    use super::*;
    use prost::Message;

    #[test]
    fn resources_round_trip_inside_any() {
        let w = Workload {
            uid: "Kubernetes//Pod/mesh/client".into(),
            name: "client".into(),
            namespace: "mesh".into(),
            addresses: vec![vec![10, 244, 1, 2]],
            tunnel_protocol: 1,
            services: [("mesh/echo.mesh.svc".to_string(), PortList::default())].into(),
            ..Default::default()
        };
        let addr = Address { r#type: Some(address::Type::Workload(w.clone())) };
        let any = prost_types::Any { type_url: ADDRESS_TYPE.into(), value: addr.encode_to_vec() };
        let resp = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE.into(),
            nonce: "1".into(),
            resources: vec![Resource {
                name: w.uid.clone(),
                version: "v1".into(),
                resource: Some(any),
                ..Default::default()
            }],
            ..Default::default()
        };
        let back = DeltaDiscoveryResponse::decode(resp.encode_to_vec().as_slice()).unwrap();
        let inner = Address::decode(back.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
        assert_eq!(inner.r#type, Some(address::Type::Workload(w)));
    }

    #[test]
    fn field_numbers_are_istios() {
        // Workload.uid is field 20 (tag 0xa2 0x01), addresses 3, tunnel_protocol 5: a change would break interop.
        let w =
            Workload { uid: "u".into(), addresses: vec![vec![1, 2, 3, 4]], tunnel_protocol: 1, ..Default::default() };
        assert_eq!(w.encode_to_vec(), [0x1a, 4, 1, 2, 3, 4, 0x28, 1, 0xa2, 0x01, 1, b'u']);
        // Authorization.dry_run is field 6; StringMatch.prefix is 2.
        let a = Authorization { dry_run: true, ..Default::default() };
        assert_eq!(a.encode_to_vec(), [0x30, 1]);
        let m = StringMatch { match_type: Some(MatchType::Prefix("x".into())) };
        assert_eq!(m.encode_to_vec(), [0x12, 1, b'x']);
    }
}
