//! A blocking rtnetlink socket: one request at a time, each acknowledged (or answered by a
//! dump) before the next. The socket belongs to the network namespace of the thread that
//! opened it, for good: the caller reaches another namespace's links by opening a socket there.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;

use netlink_packet_core::{
    ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NlasIterator,
    NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoBridgePort, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute, LinkExtentMask,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// The loopback device's index: the same in every network namespace.
const LOOPBACK_INDEX: u32 = 1;
// From linux/if_link.h and linux/rtnetlink.h.
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_IFALIAS: u16 = 20;
const RTM_NEWLINK: u16 = 16;

/// A link as a dump lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub alias: Option<String>,
    pub master: Option<u32>,
}

impl Link {
    /// The link an `RTM_NEWLINK` payload describes (`None` when it is cut short).
    fn parse(payload: &[u8]) -> Option<Self> {
        const IFINFOMSG: usize = 16;
        let index = u32::from_ne_bytes(payload.get(4..8)?.try_into().ok()?);
        let mut link = Link {
            index,
            name: String::new(),
            alias: None,
            master: None,
        };
        let text = |v: &[u8]| {
            let v = v.split(|&b| b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(v).into_owned()
        };
        for nla in NlasIterator::new(payload.get(IFINFOMSG..)?) {
            let nla = nla.ok()?;
            match nla.kind() {
                IFLA_IFNAME => link.name = text(nla.value()),
                IFLA_IFALIAS => link.alias = Some(text(nla.value())),
                IFLA_MASTER => {
                    link.master = Some(u32::from_ne_bytes(nla.value().try_into().ok()?));
                }
                _ => {}
            }
        }
        Some(link)
    }
}

pub(super) struct Rtnl {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// A socket in the calling thread's network namespace.
    pub(super) fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Dumps come in datagrams of up to 32 KiB; a larger one would be cut.
        Ok(Self {
            socket,
            seq: 0,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        Ok(self.seq)
    }

    /// Reads the answers to request `seq`, passing each link message's bytes (`ifinfomsg` and
    /// attributes) to `each`, until its ack, error or (for a dump) its end. Messages are not
    /// parsed whole: a link's full description (statistics, per-family configuration) costs
    /// more to parse than the kernel takes to write it, and only three attributes are read.
    fn receive(&mut self, seq: u32, mut each: impl FnMut(&[u8])) -> io::Result<()> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        loop {
            self.buf.clear();
            let n = self.socket.recv(&mut self.buf, 0)?;
            let mut at = 0;
            while at < n {
                let packet = NetlinkBuffer::new_checked(&self.buf[at..n])
                    .map_err(|_| invalid("a truncated netlink message"))?;
                let len = packet.length() as usize;
                at += (len + 3) & !3;
                if packet.sequence_number() != seq {
                    continue; // an answer to an earlier request that failed before reading it
                }
                match packet.message_type() {
                    NLMSG_ERROR => {
                        let error = ErrorBuffer::new_checked(packet.payload())
                            .map_err(|_| invalid("a truncated netlink error"))?;
                        return match error.code() {
                            None => Ok(()),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    NLMSG_DONE => return Ok(()),
                    RTM_NEWLINK => each(packet.payload()),
                    _ => {} // no-ops: the ack or error follows
                }
            }
        }
    }

    /// Sends `message` and waits for the kernel's ack.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let seq = self.send(message, flags | NLM_F_ACK)?;
        self.receive(seq, |_| {})
    }

    /// A link request that asks for no statistics in the answer.
    fn get_link(name: Option<&str>) -> RouteNetlinkMessage {
        let mut m = LinkMessage::default();
        if let Some(name) = name {
            m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        }
        m.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        RouteNetlinkMessage::GetLink(m)
    }

    /// Every link of this namespace.
    pub(super) fn links(&mut self) -> io::Result<Vec<Link>> {
        let seq = self.send(Self::get_link(None), NLM_F_DUMP)?;
        let mut links = Vec::new();
        self.receive(seq, |m| links.extend(Link::parse(m)))?;
        Ok(links)
    }

    /// The index of link `name`, `None` when there is none.
    pub(super) fn index(&mut self, name: &str) -> io::Result<Option<u32>> {
        let seq = self.send(Self::get_link(Some(name)), NLM_F_ACK)?;
        let mut index = None;
        match self.receive(seq, |m| index = Link::parse(m).map(|l| l.index)) {
            Ok(()) => Ok(index),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates veth `name` here, down, a port of `master`, with its peer `peer` in the
    /// namespace `netns` (a file descriptor of it).
    pub(super) fn add_veth(
        &mut self,
        name: &str,
        master: u32,
        peer: &str,
        netns: RawFd,
    ) -> io::Result<()> {
        let mut other = LinkMessage::default();
        other.attributes = vec![
            LinkAttribute::IfName(peer.to_owned()),
            LinkAttribute::NetNsFd(netns),
        ];
        let mut m = LinkMessage::default();
        m.attributes = vec![
            LinkAttribute::IfName(name.to_owned()),
            LinkAttribute::Controller(master),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(netlink_packet_route::link::InfoData::Veth(InfoVeth::Peer(
                    other,
                ))),
            ]),
        ];
        self.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Gives bridge port `name` its alias, isolates it and brings it up, in one message.
    pub(super) fn isolate_up(&mut self, name: &str, alias: &str) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes = vec![
            LinkAttribute::IfName(name.to_owned()),
            LinkAttribute::IfAlias(alias.to_owned()),
            LinkAttribute::LinkInfo(vec![
                LinkInfo::PortKind(InfoPortKind::Bridge),
                LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::Isolated(
                    true,
                )])),
            ]),
        ];
        // RTM_NEWLINK on an existing link, not RTM_SETLINK: only the former applies a
        // port's options (the latter ignores IFLA_LINKINFO without an error).
        self.request(RouteNetlinkMessage::NewLink(m), 0)
    }

    /// Brings link `index` up.
    pub(super) fn up(&mut self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(m), 0)
    }

    /// Brings the loopback up.
    pub(super) fn loopback_up(&mut self) -> io::Result<()> {
        self.up(LOOPBACK_INDEX)
    }

    /// Adds `address`/`prefix` to link `index` (as `ip addr add` does: no broadcast).
    pub(super) fn add_address(
        &mut self,
        index: u32,
        address: Ipv4Addr,
        prefix: u8,
    ) -> io::Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.prefix_len = prefix;
        m.header.index = index;
        m.attributes = vec![
            AddressAttribute::Local(address.into()),
            AddressAttribute::Address(address.into()),
        ];
        self.request(
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Adds the default route via `gateway` to the main table (as `ip route add default via`
    /// does: protocol boot, scope universe).
    pub(super) fn add_default_route(&mut self, gateway: Ipv4Addr) -> io::Result<()> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Universe;
        m.header.kind = RouteType::Unicast;
        m.attributes = vec![RouteAttribute::Gateway(RouteAddress::Inet(gateway))];
        self.request(RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Deletes link `name`; `false` when there was none.
    pub(super) fn delete(&mut self, name: &str) -> io::Result<bool> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.request(RouteNetlinkMessage::DelLink(m), 0) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::Emitable;

    use super::*;

    /// The payload the kernel would send for `m` (an `ifinfomsg` and its attributes).
    fn payload(m: &LinkMessage) -> Vec<u8> {
        let mut bytes = vec![0; m.buffer_len()];
        m.emit(&mut bytes);
        bytes
    }

    #[test]
    fn a_link_is_read_from_its_name_alias_and_master_alone() {
        let mut m = LinkMessage::default();
        m.header.index = 7;
        m.attributes = vec![
            LinkAttribute::Mtu(1500),
            LinkAttribute::IfName("anv0123abcd".into()),
            LinkAttribute::Controller(3),
            LinkAttribute::IfAlias("agentnode 10.88.0.2 k1 task".into()),
            LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]),
        ];
        let link = Link::parse(&payload(&m)).expect("a whole message");
        assert_eq!(
            link,
            Link {
                index: 7,
                name: "anv0123abcd".into(),
                alias: Some("agentnode 10.88.0.2 k1 task".into()),
                master: Some(3),
            }
        );
        let mut bare = LinkMessage::default();
        bare.header.index = 1;
        bare.attributes = vec![LinkAttribute::IfName("lo".into())];
        let lo = Link::parse(&payload(&bare)).expect("a whole message");
        assert_eq!((lo.name.as_str(), lo.alias, lo.master), ("lo", None, None));
    }

    #[test]
    fn a_cut_message_is_no_link() {
        let mut m = LinkMessage::default();
        m.attributes = vec![LinkAttribute::IfName("eth0".into())];
        let bytes = payload(&m);
        assert_eq!(Link::parse(&bytes[..6]), None);
        // The name's attribute says 9 bytes ("eth0\0"); 4 of its 12 are cut.
        assert_eq!(Link::parse(&bytes[..bytes.len() - 4]), None);
    }
}
