// Bodies of hvd's API that hvctl sends or reads too (when hvd keeps the VM): one type each,
// compiled on both sides (api/hvd.yaml). Requests refuse unknown keys as the server decodes them.

/// `POST /v1/vms/{name}/snapshot`.
public struct SnapshotRequest: Codable, Sendable {
    public var path: String
    public var stop: Bool

    public enum CodingKeys: String, CodingKey, CaseIterable { case path, stop }

    public init(path: String, stop: Bool) {
        self.path = path
        self.stop = stop
    }

    public init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        path = try c.decode(String.self, forKey: .path)
        stop = try c.decodeIfPresent(Bool.self, forKey: .stop) ?? false
    }
}

/// `POST /v1/vms/{name}/migrate`: `hvctl migrate`'s options.
public struct MigrateRequest: Codable, Sendable {
    public var to: String
    public var maxDowntimeMs: UInt64?
    public var timeoutSeconds: UInt64?
    public var bandwidth: UInt64?
    public var finishOnTimeout: Bool?
    /// The key file both hosts hold, on hvd's host (`hvctl migrate --key`).
    public var keyFile: String?
    /// Unauthenticated, unencrypted (`hvctl migrate --insecure-plaintext`).
    public var insecurePlaintext: Bool?

    public enum CodingKeys: String, CodingKey, CaseIterable {
        case to, maxDowntimeMs = "max_downtime_ms", timeoutSeconds = "timeout_seconds", bandwidth = "bandwidth_bytes_per_second"
        case finishOnTimeout = "finish_on_timeout", keyFile = "key_file", insecurePlaintext = "insecure_plaintext"
    }

    public init(to: String, maxDowntimeMs: UInt64? = nil, timeoutSeconds: UInt64? = nil, bandwidth: UInt64? = nil,
                finishOnTimeout: Bool? = nil, keyFile: String? = nil, insecurePlaintext: Bool? = nil) {
        self.to = to
        self.maxDowntimeMs = maxDowntimeMs
        self.timeoutSeconds = timeoutSeconds
        self.bandwidth = bandwidth
        self.finishOnTimeout = finishOnTimeout
        self.keyFile = keyFile
        self.insecurePlaintext = insecurePlaintext
    }

    public init(from decoder: any Decoder) throws {
        try decoder.refuseUnknownKeys(CodingKeys.allCases.map(\.rawValue))
        let c = try decoder.container(keyedBy: CodingKeys.self)
        to = try c.decode(String.self, forKey: .to)
        maxDowntimeMs = try c.decodeIfPresent(UInt64.self, forKey: .maxDowntimeMs)
        timeoutSeconds = try c.decodeIfPresent(UInt64.self, forKey: .timeoutSeconds)
        bandwidth = try c.decodeIfPresent(UInt64.self, forKey: .bandwidth)
        finishOnTimeout = try c.decodeIfPresent(Bool.self, forKey: .finishOnTimeout)
        keyFile = try c.decodeIfPresent(String.self, forKey: .keyFile)
        insecurePlaintext = try c.decodeIfPresent(Bool.self, forKey: .insecurePlaintext)
    }
}

/// A long operation hvd runs for a client that does not wait for it: `POST …/snapshot`,
/// `POST …/migrate`, `POST …/incoming` and `POST /v1/disks/convert|commit` answer 202 with one,
/// `GET /v1/jobs/{id}` tells where it stands, events (`job-progress`, `job-finished`) tell as it
/// goes, `DELETE /v1/jobs/{id}` cancels a migration, a wait or a conversion. Jobs live in hvd's
/// memory: a VM's job is the VM's work, so a job whose hvd restarts is lost from the list but not
/// from the VM (its migration or snapshot goes on); a disk job is hvd's own and ends with it.
public struct HVDJob: Codable, Sendable {
    public var id: String
    /// `snapshot`, `migrate`, `incoming`, `convert` or `commit`.
    public var type: String
    /// The VM's name; empty for a disk job.
    public var vm: String
    /// A disk job's image: the conversion's destination, the commit's overlay.
    public var disk: String?
    /// A disk job's bytes done so far, of `bytesTotal`.
    public var bytesDone: UInt64?
    public var bytesTotal: UInt64?
    /// `running`, `succeeded`, `failed` or `cancelled`.
    public var state: String
    public var started: String
    public var finished: String?
    /// A migration's last progress report.
    public var progress: MigrationProgressReport?
    /// A migration's outcome.
    public var migration: MigrationResultReport?
    /// The VM's one-line report when it succeeded.
    public var message: String?
    /// Why it failed, in one line.
    public var error: String?

    public enum CodingKeys: String, CodingKey {
        case id, type, vm, disk, bytesDone = "bytes_done", bytesTotal = "bytes_total", state, started, finished, progress, migration, message, error
    }
}

extension HVDJob {
    /// A job of `type` on `vm`, running since `started`.
    public init(id: String, type: String, vm: String, state: String, started: String) {
        self.id = id
        self.type = type
        self.vm = vm
        self.state = state
        self.started = started
    }
}

