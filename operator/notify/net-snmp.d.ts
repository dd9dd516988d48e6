// The parts of net-snmp (which ships no types) that understudy uses.
declare module "net-snmp" {
  export interface Varbind {
    oid: string;
    type: number;
    value: unknown;
  }
  export interface User {
    name: string;
    level: number;
    authProtocol?: number;
    authKey?: string;
    privProtocol?: number;
    privKey?: string;
  }
  export interface Session {
    trap(oid: string, varbinds: Varbind[], cb: (err: Error | null) => void): void;
    inform(oid: string, varbinds: Varbind[], options: object, cb: (err: Error | null) => void): void;
    close(): void;
    on(ev: "error", cb: (err: Error) => void): void;
  }
  export interface Mib {
    registerProviders(p: unknown[]): void;
    addTableRow(provider: string, row: unknown[]): void;
    deleteTableRow(provider: string, index: unknown[]): void;
    getTableCells(provider: string, byRow?: boolean, includeInstances?: boolean): unknown[][];
    getProviders(): Record<string, unknown>;
  }
  export interface Agent {
    getMib(): Mib;
    getAuthorizer(): { addCommunity(c: string): void };
    close(cb?: () => void): void;
  }
  export interface ModuleStore {
    loadFromFile(file: string): void;
    getProvidersForModule(name: string): { name: string; type: number; tableColumns?: unknown[] }[];
    translate(oid: string, fmt: string): string;
  }
  const snmp: {
    Version2c: number;
    Version3: number;
    ObjectType: Record<"OctetString" | "Integer" | "Gauge32" | "Integer32" | "OID", number>;
    SecurityLevel: Record<"noAuthNoPriv" | "authNoPriv" | "authPriv", number>;
    AuthProtocols: Record<string, number>;
    PrivProtocols: Record<string, number>;
    OidFormat: Record<"oid" | "path" | "module", string>;
    createSession(target: string, community: string, options: object): Session;
    createV3Session(target: string, user: User, options: object): Session;
    createAgent(options: object, cb: (err: Error | null, data: unknown) => void, mib?: Mib): Agent;
    createModuleStore(options?: object): ModuleStore;
  };
  export default snmp;
}
