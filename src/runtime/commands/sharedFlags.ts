/**
 * The flags every long-running command spells the same way: `--admin`, `--no-admin` and
 * `--check-config` (`--log-format` and `--log-level` are global, see `cli.ts`). Each command adds its
 * own; a flag that does not apply to a command is not offered by it.
 */
import { Option } from "effect"
import { Flag } from "effect/cli"
import { DefaultAdminAddresses } from "../Admin.ts"
import type { FlagValue } from "../ConfigLoader.ts"
import { formatHostPort } from "../NetAddress.ts"

/** `--admin` and `--no-admin`, naming `command`'s default admin address. */
export const adminFlags = (command: keyof typeof DefaultAdminAddresses) => ({
  admin: Flag.String("admin").pipe(
    Flag.withDescription(`Admin endpoint address, host:port (default ${formatHostPort(DefaultAdminAddresses[command])}; admin.address, SWITCHYARD_ADMIN_ADDRESS)`),
    Flag.optional
  ),
  noAdmin: Flag.Boolean("no-admin").pipe(Flag.withDescription("Do not serve the admin endpoint"), Flag.withDefault(false))
})

/** `--check-config`. */
export const checkConfigFlag = Flag.Boolean("check-config").pipe(
  Flag.withDescription("Validate the configuration and exit (0 when valid, 78 when not)"),
  Flag.withDefault(false)
)

/** `--admin` and `--no-admin` as overrides of the `admin` section (they win over the file and the environment). */
export const adminOverrides = (f: { readonly admin: Option.Option<string>; readonly noAdmin: boolean }): Array<FlagValue> => [
  ...(Option.isSome(f.admin) ? [{ path: ["admin", "address"], value: f.admin.value, flag: "--admin" }] : []),
  ...(f.noAdmin ? [{ path: ["admin", "enabled"], value: "false", flag: "--no-admin" }] : [])
]
