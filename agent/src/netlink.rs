//! `initialize`: the agent's link, addresses and routes, through rtnetlink.
//!
//! Idempotent: run it on every start. The link is `dummy`; on kernels without the dummy driver it
//! falls back to `ifb`, which carries addresses the same way. The IPv6 address is optional: a
//! node without IPv6 gets a warning, not a crash loop.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use netlink_packet_route::address::{AddressAttribute, AddressFlags};
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope,
};
use rtnetlink::{Handle, LinkDummy, LinkIfb, LinkUnspec, RouteMessageBuilder};

use crate::config::InitializeConfig;

/// Which rtnetlink call failed, and why.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("{call} for {subject}: {source}")]
    Call {
        call: &'static str,
        subject: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("link {0} was created but cannot be found")]
    LinkVanished(String),
    #[error(
        "a route for {address} already points at link index {other_link}, not {link}: remove it or the other link"
    )]
    RouteConflict {
        address: IpAddr,
        link: String,
        other_link: u32,
    },
}

/// The link kinds `initialize` creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    Dummy,
    Ifb,
}

impl LinkKind {
    /// The kernel's name for the link type, as `ip link` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Dummy => "dummy",
            LinkKind::Ifb => "ifb",
        }
    }
}

/// The rtnetlink operations `initialize` needs: a narrow seam, so the logic above it is tested
/// without a kernel.
#[allow(async_fn_in_trait)]
pub trait Rtnetlink {
    /// The index of the link named `name`, if it exists.
    async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError>;
    async fn add_link(&self, name: &str, kind: LinkKind) -> Result<(), NetlinkError>;
    async fn set_up(&self, index: u32) -> Result<(), NetlinkError>;
    /// Adds (or replaces) a host address, usable at once (no duplicate address detection).
    async fn add_address(&self, index: u32, address: IpAddr) -> Result<(), NetlinkError>;
    /// The output links of main-table routes whose destination is exactly `address`.
    async fn host_routes(&self, address: IpAddr) -> Result<Vec<u32>, NetlinkError>;
    async fn replace_host_route(&self, index: u32, address: IpAddr) -> Result<(), NetlinkError>;
}

/// What `initialize` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initialized {
    pub index: u32,
    /// The link kind created now; `None` when the link already existed.
    pub created: Option<LinkKind>,
    pub ipv6: bool,
}

/// Runs `initialize` against the kernel.
pub async fn initialize(config: &InitializeConfig) -> Result<Initialized, NetlinkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
    let connection = tokio::spawn(connection);
    let result = initialize_with(&Kernel(handle), config).await;
    connection.abort();
    result
}

/// The steps of `initialize`, on any [`Rtnetlink`].
pub async fn initialize_with(
    nl: &impl Rtnetlink,
    config: &InitializeConfig,
) -> Result<Initialized, NetlinkError> {
    let name = config.link_name.as_str();
    let (index, created) = match nl.link_index(name).await? {
        Some(index) => (index, None),
        None => {
            let kind = match nl.add_link(name, LinkKind::Dummy).await {
                Ok(()) => LinkKind::Dummy,
                Err(e) if is_errno(&e, libc::EOPNOTSUPP) => {
                    tracing::warn!(
                        link = name,
                        "this kernel has no dummy link driver; using an ifb link instead"
                    );
                    nl.add_link(name, LinkKind::Ifb).await?;
                    LinkKind::Ifb
                }
                Err(e) => return Err(e),
            };
            let index = nl
                .link_index(name)
                .await?
                .ok_or_else(|| NetlinkError::LinkVanished(name.to_owned()))?;
            (index, Some(kind))
        }
    };
    nl.set_up(index).await?;

    add_with_route(nl, index, name, IpAddr::V4(config.ipv4)).await?;
    let ipv6 = match add_with_route(nl, index, name, IpAddr::V6(config.ipv6)).await {
        Ok(()) => true,
        Err(e) if ipv6_unavailable(&e) => {
            tracing::warn!(address = %config.ipv6, error = %e, "IPv6 is not available on this node; serving IPv4 only");
            false
        }
        Err(e) => return Err(e),
    };
    tracing::info!(link = name, index, ?created, ipv6, "initialized");
    Ok(Initialized {
        index,
        created,
        ipv6,
    })
}

async fn add_with_route(
    nl: &impl Rtnetlink,
    index: u32,
    name: &str,
    address: IpAddr,
) -> Result<(), NetlinkError> {
    if let Some(other_link) = nl
        .host_routes(address)
        .await?
        .into_iter()
        .find(|l| *l != index)
    {
        return Err(NetlinkError::RouteConflict {
            address,
            link: name.to_owned(),
            other_link,
        });
    }
    nl.add_address(index, address).await?;
    nl.replace_host_route(index, address).await
}

fn is_errno(e: &NetlinkError, errno: i32) -> bool {
    match e {
        NetlinkError::Call {
            source: rtnetlink::Error::NetlinkError(msg),
            ..
        } => msg.code.is_some_and(|c| c.get() == -errno),
        _ => false,
    }
}

/// IPv6 disabled (sysctl or boot flag) or absent from the kernel.
fn ipv6_unavailable(e: &NetlinkError) -> bool {
    [
        libc::EACCES,
        libc::EAFNOSUPPORT,
        libc::EPERM,
        libc::EOPNOTSUPP,
        libc::EADDRNOTAVAIL,
    ]
    .iter()
    .any(|errno| is_errno(e, *errno))
}

/// [`Rtnetlink`] on a real netlink socket.
struct Kernel(Handle);

fn call(
    call: &'static str,
    subject: impl std::fmt::Display,
) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let subject = subject.to_string();
    move |source| NetlinkError::Call {
        call,
        subject,
        source,
    }
}

impl Rtnetlink for Kernel {
    async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut links = self.0.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(Some(LinkMessage { header, .. })) => Ok(Some(header.index)),
            Ok(None) => Ok(None),
            Err(e) if is_errno(&call("RTM_GETLINK", name)(e.clone()), libc::ENODEV) => Ok(None),
            Err(e) => Err(call("RTM_GETLINK", name)(e)),
        }
    }

    async fn add_link(&self, name: &str, kind: LinkKind) -> Result<(), NetlinkError> {
        let message = match kind {
            LinkKind::Dummy => LinkDummy::new(name).build(),
            LinkKind::Ifb => LinkIfb::new(name).build(),
        };
        self.0
            .link()
            .add(message)
            .execute()
            .await
            .map_err(call("RTM_NEWLINK", format!("{name} ({})", kind.as_str())))
    }

    async fn set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let message = LinkUnspec::new_with_index(index).up().build();
        self.0
            .link()
            .set(message)
            .execute()
            .await
            .map_err(call("RTM_SETLINK up", index))
    }

    async fn add_address(&self, index: u32, address: IpAddr) -> Result<(), NetlinkError> {
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        let mut request = self.0.address().add(index, address, prefix).replace();
        if address.is_ipv6() {
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        request
            .execute()
            .await
            .map_err(call("RTM_NEWADDR", address))
    }

    async fn host_routes(&self, address: IpAddr) -> Result<Vec<u32>, NetlinkError> {
        let query = match address {
            IpAddr::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpAddr::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let routes: Vec<RouteMessage> = self
            .0
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(call("RTM_GETROUTE", address))?;
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        Ok(routes
            .iter()
            .filter(|r| r.header.table == RouteHeader::RT_TABLE_MAIN)
            .filter(|r| r.header.destination_prefix_length == prefix)
            .filter(|r| {
                r.attributes.iter().any(
                    |a| matches!(a, RouteAttribute::Destination(d) if route_ip(d) == Some(address)),
                )
            })
            .filter_map(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(index) => Some(*index),
                    _ => None,
                })
            })
            .collect())
    }

    async fn replace_host_route(&self, index: u32, address: IpAddr) -> Result<(), NetlinkError> {
        let message = match address {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .output_interface(index)
                .scope(RouteScope::Link)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .output_interface(index)
                .build(),
        };
        self.0
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(call("RTM_NEWROUTE", address))
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
