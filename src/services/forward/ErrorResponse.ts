/**
 * The one-line error responses every front door sends (404, 403, 502, 504...): how the body is
 * rendered (plain text, or Docker's `{"message": "..."}` so the docker CLI prints it) and how it is
 * written to a response or, before or after an upgrade, straight onto a raw socket; and how a response
 * that cannot be completed is cut.
 */
import { Buffer } from "node:buffer"
import type * as http from "node:http"
import type { Duplex } from "node:stream"
import { ErrorCode } from "../../domain/Http2Frame.ts"

/** Renders a one-line message as a response body. */
export interface ErrorRenderer {
  readonly contentType: string
  readonly render: (message: string, status?: number) => string
}

/** What a public caller of a tunnel gateway reads instead of the detail of a 502 or 504 (the detail goes to the logs). */
export const PublicUpstreamErrors: Readonly<Record<number, string>> = {
  502: "switchyard: bad gateway (the backend could not be reached or its answer could not be relayed)",
  504: "switchyard: gateway timeout (the backend did not answer in time)"
}

/**
 * `renderer`, but 502 and 504 bodies say only what happened, never which session, stream or backend
 * address was involved: for public ports, whose callers are not the backend's operators.
 */
export const withoutUpstreamDetail = (renderer: ErrorRenderer): ErrorRenderer => ({
  contentType: renderer.contentType,
  render: (message, status) => renderer.render(status !== undefined && PublicUpstreamErrors[status] !== undefined ? PublicUpstreamErrors[status] : message, status)
})

/** `text/plain`, the message and a newline. */
export const plainErrors: ErrorRenderer = {
  contentType: "text/plain; charset=utf-8",
  render: (message) => message.replace(/[\r\n]+/g, " ") + "\n"
}

/** Docker Engine API error shape: `{"message":"..."}`, which docker clients print as the error. */
export const dockerErrors: ErrorRenderer = {
  contentType: "application/json",
  render: (message) => JSON.stringify({ message }) + "\n"
}

/** Reason phrases for the statuses the core itself produces. */
export const STATUS_TEXT: Readonly<Record<number, string>> = {
  400: "Bad Request",
  403: "Forbidden",
  404: "Not Found",
  408: "Request Timeout",
  411: "Length Required",
  413: "Content Too Large",
  431: "Request Header Fields Too Large",
  501: "Not Implemented",
  502: "Bad Gateway",
  503: "Service Unavailable",
  504: "Gateway Timeout"
}

/** Sends an error response and closes the connection after it. */
export const sendError = (res: http.ServerResponse, renderer: ErrorRenderer, status: number, message: string): void => {
  const body = renderer.render(message, status)
  res.shouldKeepAlive = false
  res.writeHead(status, {
    "content-type": renderer.contentType,
    "content-length": Buffer.byteLength(body),
    connection: "close"
  })
  res.end(body)
}

/**
 * Writes a complete error response onto a raw socket (no HTTP machinery) and ends it; to a `HEAD`
 * request (`headOnly`), the head alone, its `Content-Length` that of the body it would have had.
 */
export const writeRawError = (socket: Duplex, renderer: ErrorRenderer, status: number, message: string, headOnly = false): void => {
  if (!socket.writable) {
    socket.destroy()
    return
  }
  const body = renderer.render(message, status)
  socket.end(
    `HTTP/1.1 ${status} ${STATUS_TEXT[status] ?? "Error"}\r\n` +
      `Content-Type: ${renderer.contentType}\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n` +
      (headOnly ? "" : body)
  )
}

/**
 * Cuts a public response that cannot be completed: an HTTP/1.1 client's connection is closed; an HTTP/2
 * client's stream (a public `Http2ServerResponse` seen through `asHttp1`) is reset with INTERNAL_ERROR,
 * since a bare close of the stream would read as a complete response.
 */
export const abortResponse = (res: http.ServerResponse): void => {
  const stream = (res as { readonly stream?: { readonly close?: (code: number) => void; readonly destroyed?: boolean } }).stream
  if (stream !== undefined && typeof stream.close === "function") {
    if (stream.destroyed !== true) stream.close(ErrorCode.INTERNAL_ERROR)
  } else res.destroy()
}
