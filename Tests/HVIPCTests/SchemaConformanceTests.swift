import Foundation
import Glibc
import HVIPC
import HVSys
import XCTest

/// HVIPC against ipc-schema/: every constant equals the schema, every vector encodes to the
/// schema's bytes and decodes back, and every must-reject vector is refused for the right reason.
final class SchemaConformanceTests: XCTestCase {

    // MARK: Constants

    func testProtocolVersionAndFrameConstants() throws {
        let schema = try SchemaFiles.schema()
        XCTAssertEqual(UInt64(ProtocolVersion.major), try schema.json["protocol"]["major"].u64("protocol.major"))
        XCTAssertEqual(UInt64(ProtocolVersion.minor), try schema.json["protocol"]["minor"].u64("protocol.minor"))
        XCTAssertEqual(Frame.headerSize, try schema.constant("frame_header_size"))
        XCTAssertEqual(Frame.maximumSize, try schema.constant("frame_maximum_size"))
        XCTAssertEqual(Frame.headerSize, try schema.field("frame", "payload")["offset"].int("frame.payload offset"))
        XCTAssertEqual(Int(InheritedDescriptor.control), try schema.constant("inherited_fd_control"))
        XCTAssertEqual(Int(InheritedDescriptor.events), try schema.constant("inherited_fd_events"))
    }

    func testLimitsMatchSchema() throws {
        let schema = try SchemaFiles.schema()
        XCTAssertEqual(Hello.maximumTableEntries, try schema.constant("hello_max_table_entries"))
        XCTAssertEqual(Hello.maximumConfigBytes, try schema.constant("hello_max_config_bytes"))
        XCTAssertEqual(HelloReply.maximumNameBytes, try schema.constant("hello_reply_max_name_bytes"))
        XCTAssertEqual(LogRecord.maximumTextBytes, try schema.constant("log_max_text_bytes"))
        for count in ["region_count", "resource_count", "fd_count"] {
            XCTAssertEqual(Hello.maximumTableEntries, try schema.field("hello", count)["max"].int(count), count)
        }
        XCTAssertEqual(Hello.maximumConfigBytes, try schema.field("hello", "config_length")["max"].int("config_length"))
        XCTAssertEqual(HelloReply.maximumNameBytes, try schema.field("hello_reply", "name_length")["max"].int("name_length"))
        XCTAssertEqual(LogRecord.maximumTextBytes, try schema.field("log", "text_length")["max"].int("text_length"))
        XCTAssertEqual(Reconfigure.maximumConfigBytes, try schema.field("reconfigure", "config_length")["max"].int("config_length"))
    }

    func testMessageTypes() throws {
        let schema = try SchemaFiles.schema()
        let names: [MessageType: String] = [
            .hello: "HELLO", .shutdown: "SHUTDOWN", .ping: "PING", .quiesce: "QUIESCE", .resume: "RESUME", .setDirtyLog: "SET_DIRTY_LOG", .reconfigure: "RECONFIGURE",
            .log: "LOG", .setBootState: "SET_BOOT_STATE", .setIRQLevel: "SET_IRQ_LEVEL", .systemEvent: "SYSTEM_EVENT", .mediaChange: "MEDIA_CHANGE",
            .addDoorbell: "ADD_DOORBELL", .setMSIRoute: "SET_MSI_ROUTE",
        ]
        XCTAssertEqual(names.count, MessageType.allCases.count, "a MessageType case has no schema name in this test")
        let expected = try schema.enumValues("message_type")
        var swift: [String: UInt64] = [:]
        for t in MessageType.allCases { swift[try XCTUnwrap(names[t], "\(t)")] = UInt64(t.rawValue) }
        XCTAssertEqual(swift, expected)
        // Every message type has a 'messages' entry naming it.
        XCTAssertEqual(Set(schema.json["messages"].keys), Set(expected.keys))
    }

    func testStatuses() throws {
        let schema = try SchemaFiles.schema()
        let names: [Status: String] = [
            .ok: "OK", .unknownType: "UNKNOWN_TYPE", .malformed: "MALFORMED", .unsupportedVersion: "UNSUPPORTED_VERSION",
            .denied: "DENIED", .invalidArgument: "INVALID_ARGUMENT", .internalError: "INTERNAL_ERROR",
        ]
        XCTAssertEqual(names.count, Status.allCases.count, "a Status case has no schema name in this test")
        var swift: [String: UInt64] = [:]
        for s in Status.allCases { swift[try XCTUnwrap(names[s], "\(s)")] = UInt64(s.rawValue) }
        XCTAssertEqual(swift, try schema.enumValues("status"))
    }

    func testCapabilityBits() throws {
        let schema = try SchemaFiles.schema()
        let swift: [String: Capabilities] = [
            "REGISTER_RING": .registerRing, "STATE_PAGE": .statePage,
            "BOOT_CONTROL": .bootControl, "INTERRUPT_LEVEL": .interruptLevel, "MSI": .msi, "SNAPSHOT": .snapshot, "DIRTY_LOG": .dirtyLog,
        ]
        let bits = try schema.bits("capabilities")
        XCTAssertEqual(Set(bits.keys), Set(swift.keys))
        for (name, bit) in bits { XCTAssertEqual(swift[name]?.rawValue, 1 << UInt64(bit), name) }
        XCTAssertEqual(schema.json["bitsets"]["capabilities"]["type"].string, "u64")
    }

    func testMessageFlagBits() throws {
        let schema = try SchemaFiles.schema()
        let swift: [String: MessageFlags] = ["REPLY": .reply, "NO_REPLY": .noReply]
        let bits = try schema.bits("message_flags")
        XCTAssertEqual(Set(bits.keys), Set(swift.keys))
        for (name, bit) in bits { XCTAssertEqual(swift[name]?.rawValue, 1 << UInt16(bit), name) }
        // Reserved bits are refused, as the schema says ("unknown_bits": "reject").
        XCTAssertEqual(schema.json["bitsets"]["message_flags"]["unknown_bits"].string, "reject")
        let known = bits.values.reduce(UInt16(0)) { $0 | 1 << UInt16($1) }
        for bit in 0..<16 where known & (1 << UInt16(bit)) == 0 {
            let frame = Frame(type: 3, flags: MessageFlags(rawValue: 1 << UInt16(bit)), id: 1)
            XCTAssertThrowsError(try Frame.decode(frame.encode()), "flag bit \(bit)")
        }
    }

    /// Swift enums that are not CaseIterable: probe every raw value so an extra Swift case shows up too.
    func testSmallEnumsExhaustively() throws {
        let schema = try SchemaFiles.schema()
        func check<T>(_ enumName: String, over range: ClosedRange<UInt64>, _ make: (UInt64) -> T?, raw: (T) -> UInt64) throws {
            let expected = Set(try schema.enumValues(enumName).values)
            for v in range {
                let value = make(v)
                XCTAssertEqual(value != nil, expected.contains(v), "\(enumName) raw value \(v)")
                if let value { XCTAssertEqual(raw(value), v) }
            }
        }
        try check("fd_role", over: 0...UInt64(UInt16.max), { FDRole(rawValue: UInt16($0)) }, raw: { UInt64($0.rawValue) })
        try check("resource_kind", over: 0...255, { Resource.Kind(rawValue: UInt8($0)) }, raw: { UInt64($0.rawValue) })
        try check("log_level", over: 0...255, { LogRecord.Level(rawValue: UInt8($0)) }, raw: { UInt64($0.rawValue) })
        try check("register_operation", over: 0...255, { RegisterRequest.Operation(rawValue: UInt8($0)) }, raw: { UInt64($0.rawValue) })
        try check("boot_mode", over: 0...65536, { BootState.Mode(rawValue: UInt32($0)) }, raw: { UInt64($0.rawValue) })
        XCTAssertNil(BootState.Mode(rawValue: UInt32.max))
        try check("system_event", over: 0...65536, { SystemEvent.Kind(rawValue: UInt32($0)) }, raw: { UInt64($0.rawValue) })

        // And by name, so a swapped pair of values would be caught.
        let roles: [String: FDRole] = [
            "GUEST_MEMORY": .guestMemory, "REGISTER_RING": .registerRing, "RING_KICK": .ringKick, "RING_REPLY": .ringReply,
            "INTERRUPT": .interrupt, "STATE_PAGE": .statePage, "HOST_IO": .hostIO,
        ]
        XCTAssertEqual(try schema.enumValues("fd_role"), roles.mapValues { UInt64($0.rawValue) })
        let kinds: [String: Resource.Kind] = ["PIO": .pio, "MMIO": .mmio, "PCI_CONFIG": .pciConfig, "PCI_MMIO_BAR": .pciMMIOBar, "PCI_PIO_BAR": .pciPIOBar]
        XCTAssertEqual(try schema.enumValues("resource_kind"), kinds.mapValues { UInt64($0.rawValue) })
        let levels: [String: LogRecord.Level] = ["DEBUG": .debug, "INFO": .info, "WARNING": .warning, "ERROR": .error]
        XCTAssertEqual(try schema.enumValues("log_level"), levels.mapValues { UInt64($0.rawValue) })
        XCTAssertEqual(try schema.enumValues("boot_mode"), ["RESET": UInt64(BootState.Mode.reset.rawValue), "FLAT32": UInt64(BootState.Mode.flat32.rawValue),
                                                             "LONG64": UInt64(BootState.Mode.long64.rawValue)])
        XCTAssertEqual(try schema.enumValues("system_event"), ["POWER_OFF": UInt64(SystemEvent.Kind.powerOff.rawValue), "RESET": UInt64(SystemEvent.Kind.reset.rawValue)])
        let ops: [String: RegisterRequest.Operation] = ["PIO_READ": .pioRead, "PIO_WRITE": .pioWrite, "MMIO_READ": .mmioRead, "MMIO_WRITE": .mmioWrite,
                                                         "CONFIG_READ": .configRead, "CONFIG_WRITE": .configWrite]
        XCTAssertEqual(try schema.enumValues("register_operation"), ops.mapValues { UInt64($0.rawValue) })
        let reads = Set(schema.json["enums"]["register_operation"]["reads"].array.compactMap(\.string))
        for (name, op) in ops { XCTAssertEqual(op.isRead, reads.contains(name), name) }
        // IRQ levels are a Bool in Swift.
        let irq = try schema.enumValues("irq_level")
        XCTAssertEqual(Array(IRQLevel(line: 0, asserted: true).encode().suffix(4)), [UInt8(try XCTUnwrap(irq["ASSERTED"])), 0, 0, 0])
        XCTAssertEqual(Array(IRQLevel(line: 0, asserted: false).encode().suffix(4)), [UInt8(try XCTUnwrap(irq["DEASSERTED"])), 0, 0, 0])
    }

    func testRingLayoutConstants() throws {
        let schema = try SchemaFiles.schema()
        let ring = schema.json["ring"]
        XCTAssertEqual(UInt64(RingLayout.magic), try ring["magic"].u64("ring.magic"))
        XCTAssertEqual(withUnsafeBytes(of: RingLayout.magic.littleEndian) { String(decoding: $0, as: UTF8.self) }, ring["magic_ascii"].string)
        XCTAssertEqual(UInt64(RingLayout.version), try ring["version"].u64("ring.version"))
        XCTAssertEqual(RingLayout.headerSize, try ring["header_size"].int("ring.header_size"))
        XCTAssertEqual(RingLayout.requestEntrySize, try ring["request_entry_size"].int("ring.request_entry_size"))
        XCTAssertEqual(RingLayout.responseEntrySize, try ring["response_entry_size"].int("ring.response_entry_size"))
        XCTAssertEqual(RingLayout.requestEntrySize, try schema.json["layouts"]["ring_request_entry"]["size"].int("size"))
        XCTAssertEqual(RingLayout.responseEntrySize, try schema.json["layouts"]["ring_response_entry"]["size"].int("size"))
        let offsets: [String: Int] = [
            "magic": RingLayout.magicOffset, "version": RingLayout.versionOffset,
            "request_capacity": RingLayout.requestCapacityOffset, "response_capacity": RingLayout.responseCapacityOffset,
            "request_entry_size": RingLayout.requestEntrySizeOffset, "response_entry_size": RingLayout.responseEntrySizeOffset,
            "request_producer": RingLayout.requestProducerOffset, "request_consumer": RingLayout.requestConsumerOffset,
            "request_consumer_sleeping": RingLayout.requestConsumerSleepingOffset,
            "response_producer": RingLayout.responseProducerOffset, "response_consumer": RingLayout.responseConsumerOffset,
            "response_consumer_sleeping": RingLayout.responseConsumerSleepingOffset,
            "request_serving": RingLayout.requestServingOffset, "request_serving_active": RingLayout.requestServingActiveOffset,
            "poisoned_request": RingLayout.poisonedRequestOffset, "poisoned_request_valid": RingLayout.poisonedRequestValidOffset,
        ]
        XCTAssertEqual(try ring["offsets"].object.mapValues { try $0.int("ring offset") }, offsets)
        for (name, offset) in offsets {
            XCTAssertEqual(try schema.field("ring_header", name)["offset"].int(name), offset, name)
        }
        for (a, b) in [(1, 1), (8, 4), (256, 64), (65536, 65536)] {
            let expected = RingLayout.headerSize + a * RingLayout.requestEntrySize + b * RingLayout.responseEntrySize
            XCTAssertEqual(RingLayout.size(requestCapacity: UInt32(a), responseCapacity: UInt32(b)), expected)
        }
        // The defaults the core uses.
        let (_, ringWithDefaults) = try RegisterRing.create()
        XCTAssertEqual(UInt64(ringWithDefaults.requestCapacity), try ring["default_request_capacity"].u64("default_request_capacity"))
        XCTAssertEqual(UInt64(ringWithDefaults.responseCapacity), try ring["default_response_capacity"].u64("default_response_capacity"))
    }

    // MARK: Vectors

    func testVectorsAreCurrent() throws {
        let candidates: [String] = ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]
        let python = candidates.first { access($0, X_OK) == 0 }
        guard let python else { return XCTFail("python3 is needed to check vectors.json against messages.json (test.sh installs it)") }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: python)
        process.arguments = [SchemaFiles.repositoryRoot.appendingPathComponent("ipc-schema/tools/vectors.py").path, "--check"]
        let output = Pipe()
        process.standardOutput = output
        process.standardError = output
        try process.run()
        let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        XCTAssertEqual(process.terminationStatus, 0, text)
    }

    func testEveryMessageAndLayoutHasVectors() throws {
        let schema = try SchemaFiles.schema()
        let vectors = try SchemaFiles.vectors()
        let messages = Set(vectors["vectors"].array.compactMap { $0["message"].string })
        XCTAssertEqual(messages, Set(schema.json["messages"].keys))
        let layouts = Set(vectors["vectors"].array.compactMap { $0["layout"].string })
        for layout in ["hello", "hello_reply", "log", "set_boot_state", "set_irq_level", "system_event", "media_change", "reconfigure", "add_doorbell", "set_msi_route", "empty",
                       "ring_request_entry", "ring_response_entry", "ring_header"] {
            XCTAssertTrue(layouts.contains(layout), "no vector for layout \(layout)")
        }
        XCTAssertTrue(vectors["vectors"].array.contains { $0["frame"]["flags"].array.contains { $0.string == "REPLY" } })
        XCTAssertTrue(vectors["vectors"].array.contains { $0["frame"]["flags"].array.contains { $0.string == "NO_REPLY" } })
        XCTAssertGreaterThanOrEqual(vectors["reject"].array.count, 20)
    }

    func testVectorsEncodeAndDecode() throws {
        let schema = try SchemaFiles.schema()
        let vectors = try SchemaFiles.vectors()
        var checked = 0
        for vector in vectors["vectors"].array {
            let name = try vector["name"].string("vector name")
            do {
                let payload = try checkPayload(vector, schema: schema, name: name)
                if vector["frame"].exists {
                    try checkFrame(vector, payload: payload, schema: schema, name: name)
                }
                checked += 1
            } catch {
                XCTFail("\(name): \(error)")
            }
        }
        XCTAssertEqual(checked, vectors["vectors"].array.count)
        XCTAssertGreaterThan(checked, 0)
    }

    func testRejectVectorsAreRefused() throws {
        let schema = try SchemaFiles.schema()
        let vectors = try SchemaFiles.vectors()
        let categories = Set(schema.json["error_categories"].keys)
        var checked = 0
        for vector in vectors["reject"].array {
            let name = try vector["name"].string("vector name")
            let category = try vector["error"].string("error")
            XCTAssertTrue(categories.contains(category), "\(name): unknown category \(category)")
            let data = try bytes(fromHex: try vector["hex"].string("hex"))
            switch try vector["layout"].string("layout") {
            case "frame": expectWireError(name, category) { _ = try Frame.decode(data) }
            case "hello": expectWireError(name, category) { _ = try Hello.decode(data) }
            case "hello_reply": expectWireError(name, category) { _ = try HelloReply.decode(data) }
            case "log": expectWireError(name, category) { _ = try LogRecord.decode(data) }
            case "set_boot_state": expectWireError(name, category) { _ = try BootState.decode(data) }
            case "set_irq_level": expectWireError(name, category) { _ = try IRQLevel.decode(data) }
            case "system_event": expectWireError(name, category) { _ = try SystemEvent.decode(data) }
            case "add_doorbell": expectWireError(name, category) { _ = try DoorbellRequest.decode(data) }
            case "set_msi_route": expectWireError(name, category) { _ = try MSIRoute.decode(data) }
            case "media_change": expectWireError(name, category) { _ = try MediaChange.decode(data) }
            case "reconfigure": expectWireError(name, category) { _ = try Reconfigure.decode(data) }
            case "ring_request_entry":
                XCTAssertEqual(category, "unknown_enum", name)
                let ring = try RingFixture()
                ring.write(data, at: ring.requestSlotOffset(3))
                XCTAssertNil(ring.device.request(at: 3), name)
            case "ring_header":
                XCTAssertEqual(category, "bad_header", name)
                let region = try vector["region_size"].int("region_size")
                let fd = try memfd(size: region, contents: data)
                do {
                    _ = try RegisterRing(attaching: fd)
                    XCTFail("\(name): the ring was attached, expected \(category)")
                } catch {
                    guard case .badHeader = error else { return XCTFail("\(name): \(error), expected a bad header") }
                }
            case let other:
                XCTFail("\(name): no Swift decoder for layout \(other)")
            }
            checked += 1
        }
        XCTAssertEqual(checked, vectors["reject"].array.count)
    }

    // MARK: Helpers

    private func expectWireError(_ name: String, _ category: String, _ body: () throws -> Void) {
        do {
            try body()
            XCTFail("\(name): decoded without error, expected \(category)")
        } catch let error as WireError {
            XCTAssertTrue(Self.matches(error, category), "\(name): Swift says \(error), the schema says \(category)")
        } catch {
            XCTFail("\(name): \(error) is not a WireError")
        }
    }

    /// WireError has fewer cases than the schema's categories; several categories are `invalidField`.
    private static func matches(_ error: WireError, _ category: String) -> Bool {
        switch error {
        case .truncated: return category == "truncated"
        case .trailingBytes: return category == "trailing_bytes"
        case .lengthMismatch: return category == "length_mismatch"
        case .unknownType: return false
        case .invalidField:
            return ["reserved_nonzero", "reserved_bits", "invalid_flags", "unknown_enum", "limit_exceeded", "invalid_value"].contains(category)
        }
    }

    /// Builds the Swift value for a vector's fields, checks its encoding against `hex` and its
    /// decoding against the value. Returns the payload bytes.
    private func checkPayload(_ vector: JSONValue, schema: Schema, name: String) throws -> [UInt8] {
        let fields = vector["fields"]
        let expected = try bytes(fromHex: try vector["hex"].string("hex"))
        switch try vector["layout"].string("layout") {
        case "empty":
            XCTAssertEqual(expected, [], name)
            return []
        case "hello":
            let value = try makeHello(fields, schema)
            XCTAssertEqual(hexString(try value.encode()), hexString(expected), name)
            XCTAssertEqual(try Hello.decode(expected), value, name)
            // Counts and lengths as the schema computed them.
            XCTAssertEqual(try fields["config_length"].int("config_length"), value.config.utf8.count, name)
        case "hello_reply":
            let value = HelloReply(major: try fields["major"].fixed(UInt32.self, "major"),
                                   minor: try fields["minor"].fixed(UInt32.self, "minor"),
                                   capabilities: Capabilities(rawValue: try schema.bitsetValue("capabilities", fields["capabilities"])),
                                   name: try fields["name"].string("name"),
                                   stateVersion: try fields["state_version"].fixed(UInt16.self, "state_version"))
            XCTAssertEqual(hexString(value.encode()), hexString(expected), name)
            XCTAssertEqual(try HelloReply.decode(expected), value, name)
        case "log":
            let level = try XCTUnwrap(LogRecord.Level(rawValue: UInt8(try schema.enumValue("log_level", fields["level"]))), name)
            let value = LogRecord(level: level, text: try fields["text"].string("text"))
            XCTAssertEqual(hexString(value.encode()), hexString(expected), name)
            XCTAssertEqual(try LogRecord.decode(expected), value, name)
        case "set_boot_state":
            let mode = try XCTUnwrap(BootState.Mode(rawValue: UInt32(try schema.enumValue("boot_mode", fields["mode"]))), name)
            let value = BootState(vcpu: try fields["vcpu"].fixed(UInt32.self, "vcpu"), mode: mode,
                                  rip: try fields["rip"].u64("rip"), rsp: try fields["rsp"].u64("rsp"),
                                  rax: try fields["rax"].u64("rax"), rbx: try fields["rbx"].u64("rbx"),
                                  rsi: try fields["rsi"].u64("rsi"), cr3: try fields["cr3"].u64("cr3"),
                                  gdtBase: try fields["gdt_base"].u64("gdt_base"),
                                  gdtLimit: try fields["gdt_limit"].fixed(UInt16.self, "gdt_limit"))
            XCTAssertEqual(hexString(value.encode()), hexString(expected), name)
            XCTAssertEqual(try BootState.decode(expected), value, name)
        case "media_change":
            let present = try schema.enumValue("media_presence", fields["present"])
            let value = MediaChange(hostFile: try fields["host_file"].fixed(UInt32.self, "host_file"),
                                    present: present == (try schema.enumValues("media_presence")["INSERTED"]))
            XCTAssertEqual(hexString(value.encode()), hexString(expected), name)
            XCTAssertEqual(try MediaChange.decode(expected), value, name)
        case "reconfigure":
            let value = Reconfigure(config: try fields["config"].string("config"))
            XCTAssertEqual(hexString(try XCTUnwrap(value.encode())), hexString(expected), name)
            XCTAssertEqual(try Reconfigure.decode(expected), value, name)
            XCTAssertEqual(try fields["config_length"].int("config_length"), value.config.utf8.count, name)
        case "add_doorbell":
            let value = DoorbellRequest(resource: try fields["resource"].fixed(UInt32.self, "resource"),
                                        offset: try fields["offset"].fixed(UInt32.self, "offset"),
                                        length: try fields["length"].fixed(UInt32.self, "length"))
            XCTAssertEqual(hexString(value.encode()), hexString(expected), name)
            XCTAssertEqual(try DoorbellRequest.decode(expected), value, name)
        case "set_msi_route":
            let state = try schema.enumValue("msi_state", fields["state"])
            let value = MSIRoute(vector: try fields["vector"].fixed(UInt32.self, "vector"),
                                 enabled: state == (try schema.enumValues("msi_state")["ENABLED"]),
                                 address: try fields["address"].u64("address"),
                                 data: try fields["data"].fixed(UInt32.self, "data"))
            XCTAssertEqual(hexString(value.encode()), hexString(expected), name)
            XCTAssertEqual(try MSIRoute.decode(expected), value, name)
        case "system_event":
            let kind = try XCTUnwrap(SystemEvent.Kind(rawValue: UInt32(try schema.enumValue("system_event", fields["event"]))), name)
            let value = SystemEvent(kind)
            XCTAssertEqual(hexString(value.encode()), hexString(expected), name)
            XCTAssertEqual(try SystemEvent.decode(expected), value, name)
        case "set_irq_level":
            let level = try schema.enumValue("irq_level", fields["level"])
            let value = IRQLevel(line: try fields["line"].fixed(UInt32.self, "line"),
                                 asserted: level == (try schema.enumValues("irq_level")["ASSERTED"]))
            XCTAssertEqual(hexString(value.encode()), hexString(expected), name)
            XCTAssertEqual(try IRQLevel.decode(expected), value, name)
        case "ring_request_entry":
            try checkRequestEntry(fields, expected, schema: schema, name: name)
        case "ring_response_entry":
            try checkResponseEntry(fields, expected, name: name)
        case "ring_header":
            try checkRingHeader(fields, expected, region: try vector["region_size"].int("region_size"), name: name)
        case let other:
            throw TestFailure("no Swift mapping for layout \(other)")
        }
        return expected
    }

    private func makeHello(_ fields: JSONValue, _ schema: Schema) throws -> Hello {
        let regions = try fields["memory_regions"].array.map { r in
            MemoryRegion(guestPhysicalAddress: try r["guest_physical_address"].u64("guest_physical_address"),
                         size: try r["size"].u64("size"), memfdOffset: try r["memfd_offset"].u64("memfd_offset"))
        }
        let resources = try fields["resources"].array.map { r in
            let raw = try schema.enumValue("resource_kind", r["kind"])
            let kind = try XCTUnwrap(Resource.Kind(rawValue: UInt8(raw)), "resource kind \(raw)")
            return Resource(kind: kind, base: try r["base"].u64("base"), length: try r["length"].u64("length"))
        }
        let fds = try fields["fds"].array.map { f in
            let raw = try schema.enumValue("fd_role", f["role"])
            let role = try XCTUnwrap(FDRole(rawValue: UInt16(raw)), "fd role \(raw)")
            return FDAssignment(role: role, index: try f["index"].fixed(UInt16.self, "index"))
        }
        XCTAssertEqual(try fields["region_count"].int("region_count"), regions.count)
        XCTAssertEqual(try fields["resource_count"].int("resource_count"), resources.count)
        XCTAssertEqual(try fields["fd_count"].int("fd_count"), fds.count)
        var hello = Hello(capabilities: Capabilities(rawValue: try schema.bitsetValue("capabilities", fields["capabilities"])),
                          restartGeneration: try fields["restart_generation"].fixed(UInt32.self, "restart_generation"),
                          memoryRegions: regions, resources: resources, fds: fds, config: try fields["config"].string("config"))
        hello.major = try fields["major"].fixed(UInt32.self, "major")
        hello.minor = try fields["minor"].fixed(UInt32.self, "minor")
        return hello
    }

    private func checkFrame(_ vector: JSONValue, payload: [UInt8], schema: Schema, name: String) throws {
        let f = vector["frame"]
        let type = UInt16(try schema.enumValue("message_type", f["type"]))
        if let message = vector["message"].string {
            XCTAssertEqual(UInt64(type), try schema.enumValue("message_type", schema.json["messages"][message]["type"]), name)
            XCTAssertNotNil(MessageType(rawValue: type), name)
        }
        let flags = MessageFlags(rawValue: UInt16(try schema.bitsetValue("message_flags", f["flags"])))
        let statusRaw = try schema.enumValue("status", f["status"])
        let status = Int32(truncatingIfNeeded: statusRaw)
        let frame = Frame(type: type, flags: flags, id: try f["id"].fixed(UInt32.self, "id"), status: status, payload: payload)
        let expected = try bytes(fromHex: try vector["frame_hex"].string("frame_hex"))
        XCTAssertEqual(hexString(frame.encode()), hexString(expected), name)
        XCTAssertEqual(try Frame.decode(expected), frame, name)
        XCTAssertEqual(try f["length"].int("length"), payload.count, name)
        // Replies built the way the library builds them give the same bytes.
        if flags == .reply, let known = Status(rawValue: status) {
            let reply = Frame.reply(to: Frame(type: type, id: frame.id), status: known, payload: payload)
            XCTAssertEqual(hexString(reply.encode()), hexString(expected), name)
        }
    }

    private func makeRequest(_ fields: JSONValue, schema: Schema, name: String) throws -> RegisterRequest {
        let raw = try schema.enumValue("register_operation", fields["operation"])
        let op = try XCTUnwrap(RegisterRequest.Operation(rawValue: UInt8(raw)), name)
        return RegisterRequest(operation: op, size: try fields["size"].fixed(UInt8.self, "size"),
                               resource: try fields["resource"].fixed(UInt16.self, "resource"),
                               vcpu: try fields["vcpu"].fixed(UInt32.self, "vcpu"),
                               offset: try fields["offset"].u64("offset"), data: try fields["data"].u64("data"),
                               tag: try fields["tag"].u64("tag"))
    }

    private func checkRequestEntry(_ fields: JSONValue, _ expected: [UInt8], schema: Schema, name: String) throws {
        let request = try makeRequest(fields, schema: schema, name: name)
        // Encode: the core pushes it; read the slot's bytes. Push twice so slot 1 is checked as well.
        let ring = try RingFixture()
        XCTAssertTrue(try ring.core.pushRequest(request), name)
        XCTAssertTrue(try ring.core.pushRequest(request), name)
        XCTAssertEqual(hexString(ring.bytes(at: ring.requestSlotOffset(0), count: RingLayout.requestEntrySize)), hexString(expected), name)
        XCTAssertEqual(hexString(ring.bytes(at: ring.requestSlotOffset(1), count: RingLayout.requestEntrySize)), hexString(expected), name)
        // Decode: the schema's bytes in another slot, read by the device side.
        ring.write(expected, at: ring.requestSlotOffset(5))
        XCTAssertEqual(ring.device.request(at: 5), request, name)
        XCTAssertEqual(ring.device.request(at: 5 &+ ring.requestCapacity), request, "\(name): index is masked")
    }

    private func checkResponseEntry(_ fields: JSONValue, _ expected: [UInt8], name: String) throws {
        let response = RegisterResponse(tag: try fields["tag"].u64("tag"), data: try fields["data"].u64("data"))
        let ring = try RingFixture()
        XCTAssertTrue(ring.device.pushResponse(response), name)
        XCTAssertEqual(hexString(ring.bytes(at: ring.responseSlotOffset(0), count: RingLayout.responseEntrySize)), hexString(expected), name)
        XCTAssertEqual(try ring.core.popResponse(), response, name)
        // Decode: write the bytes into the next slot and publish it by hand, as a foreign device would.
        ring.write(expected, at: ring.responseSlotOffset(1))
        ring.setU32(2, at: RingLayout.responseProducerOffset)
        XCTAssertEqual(try ring.core.popResponse(), response, name)
        XCTAssertNil(try ring.core.popResponse(), name)
    }

    private func checkRingHeader(_ fields: JSONValue, _ expected: [UInt8], region: Int, name: String) throws {
        let requestCapacity = try fields["request_capacity"].fixed(UInt32.self, "request_capacity")
        let responseCapacity = try fields["response_capacity"].fixed(UInt32.self, "response_capacity")
        let requestProducer = try fields["request_producer"].fixed(UInt32.self, "request_producer")
        let requestConsumer = try fields["request_consumer"].fixed(UInt32.self, "request_consumer")
        let responseProducer = try fields["response_producer"].fixed(UInt32.self, "response_producer")
        let responseConsumer = try fields["response_consumer"].fixed(UInt32.self, "response_consumer")
        let deviceSleeping = try fields["request_consumer_sleeping"].int("request_consumer_sleeping") != 0
        let coreSleeping = try fields["response_consumer_sleeping"].int("response_consumer_sleeping") != 0
        XCTAssertEqual(region, RingLayout.size(requestCapacity: requestCapacity, responseCapacity: responseCapacity), name)

        // Encode: drive a real ring into the described state and compare its header page.
        let ring = try RingFixture(requestCapacity: requestCapacity, responseCapacity: responseCapacity)
        XCTAssertEqual(try ring.fd.size(), Int64(region), name)
        for i in 0..<requestProducer {
            XCTAssertTrue(try ring.core.pushRequest(RegisterRequest(operation: .pioWrite, size: 1, resource: 0, vcpu: 0, offset: 0, data: 0, tag: UInt64(i))), name)
        }
        ring.device.commitRequests(upTo: requestConsumer)
        for i in 0..<responseProducer { XCTAssertTrue(ring.device.pushResponse(RegisterResponse(tag: UInt64(i), data: 0)), name) }
        for _ in 0..<responseConsumer { XCTAssertNotNil(try ring.core.popResponse(), name) }
        if deviceSleeping { ring.device.setRequestConsumerSleeping(true, cursor: requestConsumer) }
        if coreSleeping { ring.core.setResponseConsumerSleeping(true) }
        // Poison bookkeeping: the device names what it serves; the core marks what kills it.
        let serving = try fields["request_serving"].fixed(UInt32.self, "request_serving")
        let servingActive = try fields["request_serving_active"].int("request_serving_active") != 0
        let poisoned = try fields["poisoned_request"].fixed(UInt32.self, "poisoned_request")
        let poisonedValid = try fields["poisoned_request_valid"].int("poisoned_request_valid") != 0
        if serving != 0 || servingActive {
            ring.device.beginServing(serving)
            if !servingActive { ring.device.endServing() }
        }
        if poisonedValid { ring.core.poison(poisoned) }
        XCTAssertEqual(hexString(ring.bytes(at: 0, count: RingLayout.headerSize)), hexString(expected), name)

        // Decode: a region holding exactly these bytes attaches, with these capacities and indices.
        let fd = try memfd(size: region, contents: expected)
        let attached = try RegisterRing(attaching: fd)
        XCTAssertEqual(attached.requestCapacity, requestCapacity, name)
        XCTAssertEqual(attached.responseCapacity, responseCapacity, name)
        XCTAssertEqual(attached.publishedRequestIndex(), requestProducer, name)
        XCTAssertEqual(attached.committedRequestIndex(), requestConsumer, name)
        XCTAssertEqual(attached.requestsOutstanding(), requestProducer &- requestConsumer, name)
        XCTAssertEqual(attached.requestConsumerNeedsWakeup(), deviceSleeping, name)
        XCTAssertEqual(attached.responseConsumerNeedsWakeup(), coreSleeping, name)
        var pending: UInt32 = 0
        while try attached.popResponse() != nil { pending += 1 }
        XCTAssertEqual(pending, responseProducer &- responseConsumer, name)
        XCTAssertEqual(attached.isPoisoned(poisoned), poisonedValid, name)
        if poisonedValid { XCTAssertFalse(attached.isPoisoned(poisoned &+ 1), name) }
    }
}
