// A js-libp2p peer that speaks p2pedge's DHT: dial, ping, identify, then find a card
// and a provider record through Kademlia. Prints one JSON line per step; exits 0 when
// every step worked. Usage: node js_peer.mjs NODE_MULTIADDR CARD_KEY PROVIDER_KEY_HEX
// Node 20 lacks Promise.withResolvers, which js-libp2p 3 uses: define it first.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}
const { createLibp2p } = await import('libp2p')
const { tcp } = await import('@libp2p/tcp')
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { kadDHT, passthroughMapper } = await import('@libp2p/kad-dht')
const { identify } = await import('@libp2p/identify')
const { ping } = await import('@libp2p/ping')
const { multiaddr } = await import('@multiformats/multiaddr')

const [target, cardKey, providerHex] = process.argv.slice(2)
const namespace = cardKey.split('/')[1]
const t0 = Date.now()
const say = (obj) => process.stdout.write(JSON.stringify({ ...obj, ms: Date.now() - t0 }) + '\n')
const node = await createLibp2p({
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    ping: ping(),
    dht: kadDHT({
      protocol: '/p2pedge/kad/1.0.0',
      clientMode: true,
      // the default mapper drops private and loopback addresses, which leaves the
      // routing table empty on a LAN or loopback swarm
      peerInfoMapper: passthroughMapper,
      // p2pedge's own nodes verify cards; this peer only fetches the bytes
      validators: { [namespace]: async () => {} },
      selectors: { [namespace]: () => 0 }
    })
  }
})
const fail = async (step, err) => { say({ step, ok: false, error: String(err) }); await node.stop(); process.exit(1) }
try {
  const addr = multiaddr(target)
  const table = node.services.dht.routingTable
  // kad-dht pings a new contact before it enters the table; our own ping waits for that
  // (js-libp2p allows one outbound ping stream per connection)
  const added = new Promise((resolve) => table.addEventListener('peer:add', resolve, { once: true }))
  await node.dial(addr)
  await Promise.race([added, new Promise((resolve) => setTimeout(resolve, 15000))])
  say({ step: 'routing_table', ok: table.size > 0, size: table.size })
  const rtt = await node.services.ping.ping(addr)
  say({ step: 'ping', ok: true, rtt })
  const peer = node.getPeers()[0]
  const stored = await node.peerStore.get(peer)
  say({ step: 'identify', ok: stored.protocols.includes('/p2pedge/kad/1.0.0'), protocols: stored.protocols.length })
  let card = null
  for await (const event of node.services.dht.get(new TextEncoder().encode(cardKey), { signal: AbortSignal.timeout(10000) })) {
    if (event.name === 'VALUE') { card = event.value; break }
  }
  say({ step: 'get_card', ok: card !== null, hex: card ? Buffer.from(card).toString('hex') : '' })
  if (providerHex) {
    const { CID } = await import('multiformats/cid')
    const { create } = await import('multiformats/hashes/digest')
    const bytes = Uint8Array.from(Buffer.from(providerHex, 'hex'))
    const cid = CID.createV1(0x55, create(bytes[0], bytes.subarray(2)))
    let providers = 0
    for await (const event of node.services.dht.findProviders(cid, { signal: AbortSignal.timeout(10000) })) {
      if (event.name === 'PROVIDER') { providers += event.providers.length; break }
    }
    say({ step: 'find_providers', ok: providers > 0, providers })
  }
} catch (err) {
  await fail('error', err)
}
await node.stop()
process.exit(0)
