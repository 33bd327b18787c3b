"""Reaching peers behind NAT: circuit relay v2, DCUtR hole punching, reachability, mDNS.

Each service takes a running libp2p host (``node.host``) and the few callbacks it needs,
so the composition root wires them in without this package importing ``p2pedge.node``:

- :mod:`.relay`: the public ``--relay`` role (circuit v2 hop, bounded reservations and
  relayed bytes) and the stop side every node runs to accept relayed connections;
- :mod:`.client`: reserving a slot on a relay, the ``/p2p-circuit`` addresses to put in
  the card, and dialing a peer through its relay;
- :mod:`.punch`: upgrading a relayed connection to a direct one (DCUtR), and telling
  the kinds of connection apart;
- :mod:`.autonat`: whether peers can dial us back (AutoNAT-style);
- :mod:`.mdns`: dialing the peers mDNS finds;
- :mod:`.quic`: bounded QUIC next to TCP, and dialing TCP first where a peer has both;
- :mod:`.upnp`: asking the home router to forward our port (UPnP IGD).
"""
