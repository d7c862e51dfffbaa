import HVHost

// What hvd's API takes and answers, as api/hvd.yaml describes it (the document is the contract;
// APITests and the schemathesis run check this code against it). Requests refuse unknown keys
// and name the key at fault, as VM definitions do.

/// `POST /v1/vms`.
struct CreateVMRequest: Decodable, Sendable {
    var name: String
    var definition: VMDefinition
    var autostart: Bool

    enum CodingKeys: String, CodingKey, CaseIterable { case name, definition, autostart }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        definition = try c.decodeIfPresent(VMDefinition.self, forKey: .definition) ?? VMDefinition()
        autostart = try c.decodeIfPresent(Bool.self, forKey: .autostart) ?? false
    }
}

/// `PATCH /v1/vms/{name}`: the settings that may change while the VM is kept.
struct UpdateVMRequest: Decodable, Sendable {
    var autostart: Bool?

    enum CodingKeys: String, CodingKey, CaseIterable { case autostart }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        autostart = try c.decodeIfPresent(Bool.self, forKey: .autostart)
    }
}

/// A request naming one absolute host path: the ISO for `PUT …/cdrom`, the new binary for
/// `POST …/devices/{device}/upgrade`.
struct PathRequest: Decodable, Sendable {
    var path: String

    enum CodingKeys: String, CodingKey, CaseIterable { case path }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        path = try decoder.container(keyedBy: CodingKeys.self).decode(String.self, forKey: .path)
    }
}

/// `PUT …/balloon`: the balloon's new size and/or statistics interval.
struct BalloonRequest: Decodable, Sendable {
    var sizeMiB: UInt64?
    var statsIntervalSeconds: Int?

    enum CodingKeys: String, CodingKey, CaseIterable { case sizeMiB = "size_mib", statsIntervalSeconds = "stats_interval_s" }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        sizeMiB = try c.decodeIfPresent(UInt64.self, forKey: .sizeMiB)
        statsIntervalSeconds = try c.decodeIfPresent(Int.self, forKey: .statsIntervalSeconds)
    }
}

/// `PUT …/limits`: the running VM's new cgroup limits and/or devices' rate limits (the control
/// socket's `set-limits`).
struct LimitsRequest: Decodable, Sendable {
    var limits: VMDefinition.Limits?
    var rates: [ControlRequest.RateChange]?

    enum CodingKeys: String, CodingKey, CaseIterable { case limits, rates }

    init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        limits = try c.decodeIfPresent(VMDefinition.Limits.self, forKey: .limits)
        rates = try c.decodeIfPresent([ControlRequest.RateChange].self, forKey: .rates)
    }
}

/// A kept VM: its definition, and what it is doing now.
struct VMInfo: Encodable, Sendable {
    var name: String
    /// "stopped", "running" or "paused".
    var state: String
    var autostart: Bool
    var definition: VMDefinition
    /// The running VM's own report (as `hvctl status --json`); absent while it is stopped.
    var status: VMStatus?
}

struct VMList: Encodable, Sendable {
    var vms: [VMInfo]
}

struct JobList: Encodable, Sendable {
    var jobs: [Job]
}

/// `GET /v1`.
struct ServiceInfo: Encodable, Sendable {
    var version: String
    /// Where VM sockets and consoles are (HV_RUN_DIR).
    var runDirectory: String
    var stateDirectory: String
    var vms: Int
    var running: Int

    enum CodingKeys: String, CodingKey {
        case version, runDirectory = "run_directory", stateDirectory = "state_directory", vms, running
    }
}

/// A device action's result (`restart`, `upgrade`, CD-ROM changes): the VM's one-line report.
struct ActionResult: Encodable, Sendable {
    var message: String
}

/// Every error: a status and one line naming what is wrong and what to do.
struct APIError: Error, Sendable {
    var status: Int
    var message: String

    static func badRequest(_ message: String) -> APIError { APIError(status: 400, message: message) }
    static func notFound(_ message: String) -> APIError { APIError(status: 404, message: message) }
    /// A tenant asked for what only the admin may have.
    static func forbidden(_ message: String) -> APIError { APIError(status: 403, message: message) }
    static func conflict(_ message: String) -> APIError { APIError(status: 409, message: message) }
    static func tooLarge(_ message: String) -> APIError { APIError(status: 413, message: message) }
    /// The request was well formed but the VM could not do it (an image that does not open, a
    /// device that refused).
    static func unprocessable(_ message: String) -> APIError { APIError(status: 422, message: message) }
    /// hvd itself failed (its state directory cannot be written).
    static func internalFailure(_ message: String) -> APIError { APIError(status: 500, message: message) }
    static func noVM(_ name: String) -> APIError { .notFound("no VM named '\(name)' (see GET /v1/vms)") }

    struct Body: Encodable { var error: String }
}
