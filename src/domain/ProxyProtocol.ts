/**
 * The PROXY protocol header (HAProxy's specification, versions 1 and 2) that a raw TCP connection can
 * start with, so the backend behind a tunnel learns the public peer's address instead of the tunnel
 * client's. Only the PROXY command over TCP is written; addresses that are not an IPv4 or IPv6 pair of
 * the same family are sent as unknown (version 1 `PROXY UNKNOWN`, version 2 `AF_UNSPEC`), which tells
 * the backend to use the connection's own endpoints.
 */
import { Buffer } from "node:buffer"
import * as net from "node:net"

export type ProxyProtocolVersion = "v1" | "v2"

/** Both ends of the public connection, as the gateway saw them. */
export interface ProxiedConnection {
  readonly sourceAddress: string
  readonly sourcePort: number
  readonly destinationAddress: string
  readonly destinationPort: number
}

/** Version 2's fixed first twelve bytes. */
export const ProxyV2Signature: Buffer = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a])

/** `::ffff:a.b.c.d` (an IPv4 peer on a dual-stack socket) as `a.b.c.d`. */
const unmapped = (address: string): string => {
  const m = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address)
  return m !== null ? m[1]! : address
}

const validPort = (port: number): boolean => Number.isInteger(port) && port >= 0 && port <= 65_535

/** The address family both ends share (4 or 6), or 0 when they cannot be written as one. */
const familyOf = (c: ProxiedConnection): { readonly family: 0 | 4 | 6; readonly source: string; readonly destination: string } => {
  const source = unmapped(c.sourceAddress)
  const destination = unmapped(c.destinationAddress)
  const family = net.isIP(source)
  if (family === 0 || family !== net.isIP(destination) || !validPort(c.sourcePort) || !validPort(c.destinationPort)) {
    return { family: 0, source, destination }
  }
  return { family: family as 4 | 6, source, destination }
}

/** The 16 bytes of an IPv6 address (`::` forms and embedded IPv4 included). */
const ipv6Bytes = (address: string): Buffer => {
  const out = Buffer.alloc(16)
  let text = address
  // a trailing dotted IPv4 part becomes two groups
  const v4 = /(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text)
  if (v4 !== null) {
    const [a, b, c, d] = [v4[1], v4[2], v4[3], v4[4]].map(Number) as [number, number, number, number]
    text = `${text.slice(0, v4.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`
  }
  const [head, tail] = text.includes("::") ? text.split("::") as [string, string] : [text, undefined]
  const groups = (s: string | undefined) => s === undefined || s === "" ? [] : s.split(":").map((g) => parseInt(g, 16))
  const front = groups(head)
  const back = groups(tail)
  const all = [...front, ...Array<number>(8 - front.length - back.length).fill(0), ...back]
  all.forEach((g, i) => out.writeUInt16BE(g, i * 2))
  return out
}

/** Version 1: one line of text, `PROXY TCP4 src dst sport dport\r\n`. */
export const encodeProxyV1 = (c: ProxiedConnection): Buffer => {
  const { family, source, destination } = familyOf(c)
  if (family === 0) return Buffer.from("PROXY UNKNOWN\r\n", "latin1")
  return Buffer.from(`PROXY TCP${family} ${source} ${destination} ${c.sourcePort} ${c.destinationPort}\r\n`, "latin1")
}

/** Version 2: the signature, version and command (0x21), family and protocol, length, addresses, ports. */
export const encodeProxyV2 = (c: ProxiedConnection): Buffer => {
  const { family, source, destination } = familyOf(c)
  if (family === 0) return Buffer.concat([ProxyV2Signature, Buffer.from([0x21, 0x00, 0x00, 0x00])])
  const addresses = family === 4
    ? Buffer.from([...source.split(".").map(Number), ...destination.split(".").map(Number)])
    : Buffer.concat([ipv6Bytes(source), ipv6Bytes(destination)])
  const ports = Buffer.alloc(4)
  ports.writeUInt16BE(c.sourcePort, 0)
  ports.writeUInt16BE(c.destinationPort, 2)
  const head = Buffer.alloc(4)
  head[0] = 0x21 // version 2, PROXY
  head[1] = family === 4 ? 0x11 : 0x21 // AF_INET or AF_INET6, over STREAM
  head.writeUInt16BE(addresses.length + ports.length, 2)
  return Buffer.concat([ProxyV2Signature, head, addresses, ports])
}

/** The header of `version` for `c`. */
export const encodeProxyHeader = (version: ProxyProtocolVersion, c: ProxiedConnection): Buffer =>
  version === "v1" ? encodeProxyV1(c) : encodeProxyV2(c)
