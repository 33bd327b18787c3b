"""simnet: dozens of real p2pedge Nodes in one trio process, on 127.0.0.1."""

from simnet.swarm import Swarm as Swarm
