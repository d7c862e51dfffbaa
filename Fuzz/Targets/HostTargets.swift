import Glibc
import HVCore
import HVFirecrackerModel
import HVHost
import HVSandbox
import HVSys

/// The trusted side's parsers of documents and streams: sandbox profiles and plugin manifests
/// (plugin authors), VM definitions and control requests (operators and tenants, through hvctl,
/// hvd and the control socket), Firecracker API bodies (hv-firecracker's API client), snapshot
/// files (anyone who can write the directory) and the migration stream (the source host).
enum HostTargets {
    /// hv's own JSON reader (sandbox profiles, plugin manifests).
    static let json = FuzzTarget("json", covers: "hv's JSON reader (HVSandbox, used by the jail and for profiles and manifests)") { data in
        _ = try? JSONValue.parse(Array(data))
    }

    /// A base profile for `include`, as the shipped ones are.
    static let baseProfile = #"{"profile": "base", "version": 1, "description": "fuzz base", "namespaces": ["user", "pid"], "rlimits": {"nofile": 32}, "startup_syscalls": ["read", {"name": "mmap", "allow_if": [{"arg": 2, "op": "masked_eq", "mask": 4, "value": 4}]}], "syscalls": ["write", {"name": "ioctl", "allow_if": [{"arg": 1, "op": "eq", "value": "0x5401"}]}], "enosys": ["clone3"]}"#

    /// A sandbox profile, with `include` resolved; whatever loads must come back unchanged from
    /// its flattened form (what the core hands hv-jail).
    static let sandboxProfile = FuzzTarget("sandbox-profile", covers: "sandbox profile documents, includes and argument conditions (core ← plugin author)") { data in
        func load(_ bytes: [UInt8], _ source: String, depth: Int) throws(SandboxProfileError) -> SandboxProfile {
            try SandboxProfile.load(json: bytes, source: source, resolveSyscall: DeviceCatalog.resolveSyscall) { name throws(SandboxProfileError) in
                guard depth < 4 else { return try load(Array("[]".utf8), name, depth: depth + 1) }
                return try load(Array((name == "base" ? baseProfile : name).utf8), name, depth: depth + 1)
            }
        }
        guard let profile = try? load(Array(data), "fuzz.json", depth: 0) else { return }
        let flattened = profile.jsonText()
        do {
            let again = try SandboxProfile.load(json: Array(flattened.utf8), source: "flattened", resolveSyscall: DeviceCatalog.resolveSyscall)
            FuzzCheck.that(again.syscalls == profile.syscalls && again.startupSyscalls == profile.startupSyscalls
                           && again.enosysSyscalls == profile.enosysSyscalls && again.namespaces == profile.namespaces
                           && again.limits == profile.limits,
                           "the flattened profile is not the profile: \(flattened)")
        } catch {
            FuzzCheck.that(false, "the flattened profile does not load: \(error)\n\(flattened)")
        }
        _ = profile.render(header: ["fuzz"])
    }

    /// A control-socket request (hvctl, hvd and tenants speak this to a VM's core).
    static let controlRequest = FuzzTarget("control-request", covers: "control-socket request JSON (core ← hvctl, hvd, tenants)") { data in
        guard let request = try? ControlJSON.decode(ControlRequest.self, Array(data)) else { return }
        let again = try? ControlJSON.decode(ControlRequest.self, ControlJSON.encode(request))
        FuzzCheck.that(again == request, "a control request does not round-trip")
    }

    /// A VM definition (`hvctl run --config`, hvd's API, a snapshot's record): decoded, checked,
    /// printed and read back the same.
    static let vmDefinition = FuzzTarget("vm-definition", covers: "VM definition JSON and its validation (core ← operators, hvd API, snapshots)") { data in
        guard let definition = try? VMDefinition.decode(Array(data)) else { return }
        _ = try? definition.validate(naming: .keys)
        _ = definition.resolvingPaths(against: "/fuzz")
        let again = try? VMDefinition.decode(Array(definition.encoded().utf8))
        FuzzCheck.that(again == definition, "a VM definition does not round-trip")
    }

    /// A Firecracker API request body, or a whole `--config-file`, as hv-firecracker decodes it.
    /// The first byte picks the body's type, the rest is the JSON. What decodes must encode and
    /// decode back the same (one `PUT` answered by a `GET` of what was stored), and the hv limits
    /// built from it (balloon, rate limiters) come back as a value or a fault.
    static let firecrackerAPI = FuzzTarget("firecracker-api", covers: "Firecracker API request bodies and --config-file (hv-firecracker ← its API client)") { data in
        var input = FuzzInput(data)
        let kind = input.u8()
        let body = input.bytes(input.remaining)
        func roundTrip<T: Codable & Equatable>(_ type: T.Type) -> T? {
            guard let value = try? ControlJSON.decode(type, body) else { return nil }
            let again = try? ControlJSON.decode(type, ControlJSON.encode(value))
            FuzzCheck.that(again == value, "a \(type) body does not round-trip: \(String(decoding: ControlJSON.encode(value), as: UTF8.self))")
            return value
        }
        func decodes<T: Decodable>(_ type: T.Type) -> T? { try? ControlJSON.decode(type, body) }
        switch kind % 16 {
        case 0: _ = roundTrip(MachineConfiguration.self)
        case 1: _ = try? roundTrip(BalloonConfig.self)?.hvBalloon()
        case 2: _ = decodes(BalloonUpdate.self)
        case 3: _ = decodes(BalloonStatisticsUpdate.self)
        case 4: _ = roundTrip(BootSource.self)
        case 5: _ = try? roundTrip(RateLimiter.self)?.hvLimit("rate_limiter")
        case 6: _ = try? roundTrip(Drive.self)?.rateLimiter?.hvLimit("rate_limiter")
        case 7: _ = try? roundTrip(PartialDrive.self)?.rateLimiter?.hvLimit("rate_limiter")
        case 8: _ = try? roundTrip(NetworkInterface.self)?.rxRateLimiter?.hvLimit("rx_rate_limiter")
        case 9: _ = try? roundTrip(PartialNetworkInterface.self)?.txRateLimiter?.hvLimit("tx_rate_limiter")
        case 10: _ = roundTrip(LoggerConfig.self)
        case 11: _ = roundTrip(MetricsConfig.self)
        case 12: _ = decodes(InstanceActionInfo.self)
        case 13: _ = decodes(VMState.self)
        case 14: _ = (decodes(SnapshotCreateParams.self), decodes(SnapshotLoadParams.self))
        default:
            // No Equatable here: the encoding of what decoded must decode to the same encoding.
            guard let config = decodes(FullVMConfiguration.self) else { return }
            let encoded = ControlJSON.encode(config)
            let again = try? ControlJSON.decode(FullVMConfiguration.self, encoded)
            FuzzCheck.that(again.map { ControlJSON.encode($0) } == encoded, "a --config-file does not round-trip: \(String(decoding: encoded, as: UTF8.self))")
            _ = try? config.balloon?.hvBalloon()
        }
    }

    /// A plugin manifest (`--device MANIFEST.json`, `hvctl plugin validate`).
    static let pluginManifest = FuzzTarget("plugin-manifest", covers: "plugin manifests: resources, settings, paths (core ← plugin author)") { data in
        _ = try? PluginManifest.parse(Array(data), source: "/fuzz/plugin.json")
    }

    /// A snapshot's state file (sections, checksums, vCPU, platform, device and memory records).
    /// An input whose first byte is even is the file itself (framing and checksums under test);
    /// otherwise it is a list of sections (tag byte, u16 length, payload) framed with valid
    /// checksums, as a forger would, so the records behind the checksums are reached.
    static let snapshotState = FuzzTarget("snapshot-state", covers: "snapshot state file: sections, checksums, vCPU/platform/device/memory records (core ← snapshot directory)") { data in
        var input = FuzzInput(data)
        let file: [UInt8]
        if input.u8() & 1 == 0 {
            file = input.rest()
        } else {
            var sections: [(tag: UInt32, payload: [UInt8])] = []
            while !input.isAtEnd {
                let tag = UInt32(input.u8() % 11)
                sections.append((tag, input.bytes(Int(input.integer(UInt16.self)))))
            }
            file = MachineSnapshot.stateFile(sections: sections)
        }
        _ = try? MachineSnapshot.decodeState(file, name: "fuzz")
    }

    /// The migration stream as a destination reads it from a source host: header, memory frames,
    /// machine state, handover. Guest RAM above 64 MiB is not allocated here (it costs time, not
    /// coverage); everything the header check accepts below that is.
    ///
    /// As for snapshots, an input whose first byte is even is the byte stream itself, opening
    /// included (bit 1 of that byte: the destination holds a key, so the opening, the proofs and
    /// the sealed records are what gets parsed); otherwise it is a valid plaintext opening and a
    /// list of frames (type byte, u16 length, payload) sent with valid checksums, the first
    /// prefixed with the protocol's magic and version.
    static let migrationStream = FuzzTarget("migration-stream", covers: "migration stream: header, page and zero frames, machine state (destination ← source host)") { data in
        var input = FuzzInput(data)
        var stream: [UInt8] = []
        var security = MigrationSecurity.plaintext
        let mode = input.u8()
        if mode & 1 == 0 {
            stream = input.rest()
            if mode & 2 != 0, let key = try? MigrationKey(bytes: [UInt8](repeating: 0x5A, count: 32)) { security = .sharedKey(key) }
        } else {
            stream = MigrationOpening(version: MigrationChannel.version, mode: MigrationOpening.plaintextMode,
                                      nonce: [UInt8](repeating: 0, count: MigrationOpening.nonceSize)).encode()
            var first = true
            while !input.isAtEnd {
                let type = UInt32(input.u8() % 12)
                var payload = input.bytes(Int(input.integer(UInt16.self)))
                if first { payload = MigrationChannel.versionStamp() + payload }
                first = false
                stream += payload.withUnsafeBytes { MigrationChannel.frameHeader(type: type, $0) } + payload
            }
        }
        var pair: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else { fatalError("socketpair failed") }
        let source = FileDescriptor(owning: pair[0])
        var size = Int32(1 << 20)
        setsockopt(pair[0], SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(pair[1], SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        // Written whole before the destination reads: no more than the socket buffers hold.
        try? source.writeAll(Array(stream.prefix(128 << 10)))
        shutdown(pair[0], Int32(SHUT_WR))
        let incoming = IncomingMigration(channel: MigrationChannel(socket: FileDescriptor(owning: pair[1]), peer: "fuzz source"))
        defer { incoming.channel.close(); source.close() }
        guard (try? incoming.channel.establish(security, as: .destination, timeoutSeconds: 1)) != nil else { return }
        guard let hello = try? incoming.receiveHello(), hello.memoryBytes <= 64 << 20 else { return }
        guard (try? incoming.accept()) != nil else { return }
        _ = try? incoming.receiveMemoryAndState()
    }
}
