//! `initialize`'s steps against a fake kernel.

use std::cell::RefCell;
use std::collections::HashMap;
use std::num::NonZeroI32;

use rtnetlink::packet_core::ErrorMessage;

use super::*;

#[derive(Default)]
struct FakeKernel {
    links: RefCell<HashMap<String, (u32, LinkKind)>>,
    up: RefCell<Vec<u32>>,
    addresses: RefCell<Vec<(u32, IpAddr)>>,
    routes: RefCell<Vec<(u32, IpAddr)>>,
    no_dummy: bool,
    no_ipv6: bool,
}

fn errno(call: &'static str, errno: i32) -> NetlinkError {
    let mut msg = ErrorMessage::default();
    msg.code = NonZeroI32::new(-errno);
    NetlinkError::Call {
        call,
        subject: "test".into(),
        source: rtnetlink::Error::NetlinkError(msg),
    }
}

impl Rtnetlink for FakeKernel {
    async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self.links.borrow().get(name).map(|(i, _)| *i))
    }
    async fn add_link(&self, name: &str, kind: LinkKind) -> Result<(), NetlinkError> {
        if kind == LinkKind::Dummy && self.no_dummy {
            return Err(errno("RTM_NEWLINK", libc::EOPNOTSUPP));
        }
        let index = 10 + u32::try_from(self.links.borrow().len()).unwrap();
        self.links.borrow_mut().insert(name.into(), (index, kind));
        Ok(())
    }
    async fn set_up(&self, index: u32) -> Result<(), NetlinkError> {
        self.up.borrow_mut().push(index);
        Ok(())
    }
    async fn add_address(&self, index: u32, address: IpAddr) -> Result<(), NetlinkError> {
        if address.is_ipv6() && self.no_ipv6 {
            return Err(errno("RTM_NEWADDR", libc::EACCES));
        }
        let mut addresses = self.addresses.borrow_mut();
        if !addresses.contains(&(index, address)) {
            addresses.push((index, address));
        }
        Ok(())
    }
    async fn host_routes(&self, address: IpAddr) -> Result<Vec<u32>, NetlinkError> {
        Ok(self
            .routes
            .borrow()
            .iter()
            .filter(|(_, a)| *a == address)
            .map(|(i, _)| *i)
            .collect())
    }
    async fn replace_host_route(&self, index: u32, address: IpAddr) -> Result<(), NetlinkError> {
        let mut routes = self.routes.borrow_mut();
        routes.retain(|(_, a)| *a != address);
        routes.push((index, address));
        Ok(())
    }
}

fn config() -> InitializeConfig {
    InitializeConfig {
        link_name: "pod-id-link0".into(),
        ipv4: crate::cli::AGENT_IPV4,
        ipv6: crate::cli::AGENT_IPV6,
    }
}

#[tokio::test]
async fn creates_a_dummy_link_with_both_addresses_and_routes() {
    let k = FakeKernel::default();
    let done = initialize_with(&k, &config()).await.unwrap();
    assert_eq!(
        done,
        Initialized {
            index: 10,
            created: Some(LinkKind::Dummy),
            ipv6: true
        }
    );
    assert_eq!(k.up.borrow().as_slice(), &[10]);
    let v4 = IpAddr::V4(crate::cli::AGENT_IPV4);
    let v6 = IpAddr::V6(crate::cli::AGENT_IPV6);
    assert_eq!(k.addresses.borrow().as_slice(), &[(10, v4), (10, v6)]);
    assert_eq!(k.routes.borrow().as_slice(), &[(10, v4), (10, v6)]);
}

#[tokio::test]
async fn falls_back_to_ifb_without_the_dummy_driver() {
    let k = FakeKernel {
        no_dummy: true,
        ..FakeKernel::default()
    };
    let done = initialize_with(&k, &config()).await.unwrap();
    assert_eq!(done.created, Some(LinkKind::Ifb));
    assert_eq!(k.links.borrow()["pod-id-link0"].1, LinkKind::Ifb);
}

#[tokio::test]
async fn is_idempotent() {
    let k = FakeKernel::default();
    initialize_with(&k, &config()).await.unwrap();
    let again = initialize_with(&k, &config()).await.unwrap();
    assert_eq!(again.created, None);
    assert_eq!(k.links.borrow().len(), 1);
    assert_eq!(k.addresses.borrow().len(), 2);
    assert_eq!(k.routes.borrow().len(), 2);
}

#[tokio::test]
async fn ipv6_is_optional() {
    let k = FakeKernel {
        no_ipv6: true,
        ..FakeKernel::default()
    };
    let done = initialize_with(&k, &config()).await.unwrap();
    assert!(!done.ipv6);
    assert_eq!(k.addresses.borrow().len(), 1);
}

#[tokio::test]
async fn a_route_on_another_link_is_a_clear_error() {
    let k = FakeKernel::default();
    k.routes
        .borrow_mut()
        .push((3, IpAddr::V4(crate::cli::AGENT_IPV4)));
    let err = initialize_with(&k, &config()).await.unwrap_err();
    assert!(
        matches!(err, NetlinkError::RouteConflict { other_link: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("169.254.170.23"), "{err}");
}
