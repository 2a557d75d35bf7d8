/**
 * The socket proxy's label scope applied to one allowed request: lists get the label filter, creates
 * are marked for labelling, calls on one container or exec are resolved through the Engine and either
 * answered 404 (outside the scope, as if the container did not exist) or forwarded with the full id in
 * the path, and calls the scope cannot check are refused. It does not judge rules or bodies; the
 * caller's `next` does what follows (forward, or read the body).
 */
import type { CanonicalTarget } from "../../domain/HttpHeaders.ts"
import { type ContainerLabel, labelFilterValue, pinnedTarget, scopedCall, scopeFilters } from "../../domain/LabelScope.ts"
import type { Admission, PendingAdmission } from "../forward/http1/Admission.ts"
import type { Resolution, ScopeResolver } from "./ScopeResolver.ts"

export interface ScopedAdmissionOptions {
  readonly label: ContainerLabel
  readonly resolver: ScopeResolver
  readonly ruleSetName: () => string
  /** Told each refusal: status and message (for the log and the counters). */
  readonly onRefuse: (status: number, message: string) => void
}

/** What the caller does once the scope let a request on: the target to forward, and whether its body gets the label. */
export type ScopedNext = (upstreamTarget: string, labelBody: boolean) => Admission

export interface ScopedAdmission {
  readonly admit: (method: string, target: CanonicalTarget, next: ScopedNext) => Admission | PendingAdmission
}

export const makeScopedAdmission = (options: ScopedAdmissionOptions): ScopedAdmission => {
  const scope = labelFilterValue(options.label)
  const refuse = (status: number, message: string, clientMessage = message): Admission => {
    options.onRefuse(status, message)
    return { _tag: "Refuse", status, message: clientMessage }
  }

  const settle = (
    kind: "containers" | "exec",
    name: string,
    method: string,
    target: CanonicalTarget,
    r: Resolution,
    pin: (id: string) => Admission
  ): Admission => {
    const missing = kind === "containers" ? `No such container: ${name}` : `No such exec instance: ${name}`
    switch (r._tag) {
      case "Found":
        if (r.inScope) return pin(r.id)
        return refuse(
          404,
          `switchyard socket-proxy: ${method} ${target.path}: ${kind === "containers" ? "container" : "the container of exec"} ${JSON.stringify(name)} is outside the label scope ${scope} of rule set "${options.ruleSetName()}" (answered 404)`,
          missing
        )
      case "Missing":
        return { _tag: "Refuse", status: 404, message: missing }
      case "Failed":
        return refuse(r.status, `switchyard socket-proxy: ${method} ${target.path}: the label scope could not look up ${JSON.stringify(name)}: ${r.reason}`)
    }
  }

  const resolved = (
    kind: "containers" | "exec",
    name: string,
    method: string,
    target: CanonicalTarget,
    pin: (id: string) => Admission
  ): Admission | PendingAdmission => {
    const hit = options.resolver.cached(kind, name)
    if (hit !== undefined) return settle(kind, name, method, target, hit, pin)
    return {
      _tag: "Pending",
      wait: (decide) => options.resolver.resolve(kind, name, (r) => decide(settle(kind, name, method, target, r, pin)))
    }
  }

  const hadQuery = (target: CanonicalTarget) => target.upstreamTarget.includes("?")

  return {
    admit: (method, target, next) => {
      const call = scopedCall(method, target.path)
      switch (call._tag) {
        case "Pass":
          return next(target.upstreamTarget, false)
        case "Label":
          return next(target.upstreamTarget, true)
        case "Refuse":
          return refuse(403, `switchyard socket-proxy: ${method} ${target.path} is refused by the label scope ${scope} of rule set "${options.ruleSetName()}": ${call.reason}`)
        case "Filter": {
          const query = scopeFilters(target.query, options.label)
          if (typeof query !== "string") return refuse(400, `switchyard socket-proxy: ${method} ${target.path}: ${query.reason}`)
          const q = target.upstreamTarget.indexOf("?")
          return next(`${q === -1 ? target.upstreamTarget : target.upstreamTarget.slice(0, q)}?${query}`, false)
        }
        case "Container":
          return resolved("containers", call.name, method, target, (id) =>
            next(pinnedTarget(target.apiVersion, call.prefix, "containers", id, call.action, target.query, hadQuery(target)), false))
        case "Exec":
          return resolved("exec", call.id, method, target, (id) =>
            next(pinnedTarget(target.apiVersion, call.prefix, "exec", id, call.action, target.query, hadQuery(target)), false))
      }
    }
  }
}
