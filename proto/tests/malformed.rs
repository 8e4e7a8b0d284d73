// SPDX-License-Identifier: Apache-2.0
//! Malformed input over a real Unix socket: each gets ERROR with its typed
//! code and (for framing errors) a close; the server keeps serving others.
#![allow(clippy::unwrap_used)]

mod common;

use cell0_proto::host::{EchoService, Server};
use cell0_proto::msg::{Call, Hello, Ping};
use cell0_proto::{ErrorCode, Frame, HEADER_LEN, Kind, MAX_PAYLOAD};
use common::{Raw, TestServer, guard};

fn header(version: u8, kind: u8, request_id: u64, len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(b"SYP1");
    h.push(version);
    h.push(kind);
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&request_id.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h
}

async fn assert_still_serving(server: &TestServer) {
    let client = server.client().await;
    let reply = guard("echo", client.call("echo", "echo", &b"still here"[..]))
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"still here");
}

/// Sends `bytes` (then optionally half-closes) and expects ERROR(code) then a close.
async fn refused(server: &TestServer, bytes: &[u8], half_close: bool, code: ErrorCode) {
    let mut raw = Raw::connect(&server.path).await;
    raw.send(bytes).await;
    if half_close {
        tokio::io::AsyncWriteExt::shutdown(&mut raw.writer)
            .await
            .unwrap();
    }
    let msg = raw.expect_error(0, code).await;
    assert!(!msg.message.is_empty());
    raw.expect_closed().await;
}

#[tokio::test]
async fn bad_magic_gets_bad_magic_and_a_close() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    refused(
        &server,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        false,
        ErrorCode::BadMagic,
    )
    .await;
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn unknown_version_gets_unknown_version_and_a_close() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    refused(
        &server,
        &header(2, Kind::Ping.as_u8(), 1, 0),
        false,
        ErrorCode::UnknownVersion,
    )
    .await;
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn unknown_kind_gets_unknown_kind_and_a_close() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    refused(
        &server,
        &header(1, 200, 1, 0),
        false,
        ErrorCode::UnknownKind,
    )
    .await;
}

#[tokio::test]
async fn oversize_gets_oversize_without_reading_the_payload() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    let len = u32::try_from(MAX_PAYLOAD + 1).unwrap();
    refused(
        &server,
        &header(1, Kind::Call.as_u8(), 1, len),
        false,
        ErrorCode::Oversize,
    )
    .await;
    // The largest possible header value too.
    refused(
        &server,
        &header(1, Kind::Call.as_u8(), 1, u32::MAX),
        false,
        ErrorCode::Oversize,
    )
    .await;
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn truncated_payload_then_eof_gets_truncated() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    let mut bytes = header(1, Kind::Call.as_u8(), 9, 100);
    bytes.extend_from_slice(&[0u8; 10]);
    refused(&server, &bytes, true, ErrorCode::Truncated).await;
    // EOF inside the header.
    refused(
        &server,
        &header(1, Kind::Ping.as_u8(), 1, 0)[..10],
        true,
        ErrorCode::Truncated,
    )
    .await;
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn a_malformed_payload_is_refused_but_the_connection_stays() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    let mut raw = Raw::connect(&server.path).await;
    raw.hello().await;
    // A CALL whose payload is not a protobuf Call.
    raw.send_frame(&Frame::new(Kind::Call, 5, vec![0xff, 0xff, 0xff]))
        .await;
    raw.expect_error(5, ErrorCode::MalformedPayload).await;
    raw.send_frame(&Frame::from_message(
        Kind::Ping,
        6,
        &Ping {
            nonce: 42,
            timestamp_ns: 1,
        },
    ))
    .await;
    let pong = raw.next_frame().await;
    assert_eq!((pong.kind, pong.request_id), (Kind::Pong, 6));
    let p: Ping = pong.decode_message().unwrap();
    assert_eq!(p.nonce, 42);
}

#[tokio::test]
async fn session_rules_not_hello_already_hello_and_unexpected_kind() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    let mut raw = Raw::connect(&server.path).await;
    let call = Call {
        service: "echo".into(),
        method: "echo".into(),
        ..Default::default()
    };
    raw.send_frame(&Frame::from_message(Kind::Call, 3, &call))
        .await;
    raw.expect_error(3, ErrorCode::NotHello).await;
    // PING works before HELLO.
    raw.send_frame(&Frame::new(Kind::Ping, 4, Vec::new())).await;
    assert_eq!(raw.next_frame().await.kind, Kind::Pong);
    raw.hello().await;
    raw.send_frame(&Frame::from_message(Kind::Hello, 7, &Hello::default()))
        .await;
    raw.expect_error(7, ErrorCode::AlreadyHello).await;
    raw.send_frame(&Frame::new(Kind::Reply, 8, Vec::new()))
        .await;
    raw.expect_error(8, ErrorCode::UnexpectedKind).await;
    // The session still works, and replies echo the channel.
    raw.send_frame(&Frame::from_message(Kind::Call, 9, &call).with_channel(77))
        .await;
    let reply = raw.next_frame().await;
    assert_eq!(
        (reply.kind, reply.request_id, reply.channel),
        (Kind::Reply, 9, 77)
    );
}

#[tokio::test]
async fn hello_without_a_common_version_is_refused() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    let mut raw = Raw::connect(&server.path).await;
    let hello = Hello {
        versions: vec![2, 3],
        ..Default::default()
    };
    raw.send_frame(&Frame::from_message(Kind::Hello, 1, &hello))
        .await;
    raw.expect_error(1, ErrorCode::UnknownVersion).await;
    raw.hello().await;
}

#[tokio::test]
async fn goodbye_is_echoed_and_the_server_closes() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    let mut raw = Raw::connect(&server.path).await;
    raw.hello().await;
    // A slow call in flight is answered before the GOODBYE echo.
    let call = Call {
        service: "echo".into(),
        method: "sleep".into(),
        payload: 50u32.to_le_bytes().to_vec().into(),
        shm: vec![],
    };
    raw.send_frame(&Frame::from_message(Kind::Call, 2, &call))
        .await;
    raw.send_frame(&Frame::new(Kind::Goodbye, 0, Vec::new()))
        .await;
    let reply = raw.next_frame().await;
    assert_eq!((reply.kind, reply.request_id), (Kind::Reply, 2));
    assert_eq!(raw.next_frame().await.kind, Kind::Goodbye);
    raw.expect_closed().await;
}

#[tokio::test]
async fn server_limits_payload_size_and_idle_time() {
    let config = cell0_proto::host::ServerConfig {
        max_payload: 1024,
        idle_timeout: Some(std::time::Duration::from_millis(200)),
        ..Default::default()
    };
    let server = TestServer::start(Server::new(EchoService::new()).with_config(config)).await;
    let mut raw = Raw::connect(&server.path).await;
    raw.hello().await;
    raw.send(&header(1, Kind::Call.as_u8(), 2, 2000)).await;
    raw.expect_error(0, ErrorCode::Oversize).await;
    raw.expect_closed().await;

    let mut idle = Raw::connect(&server.path).await;
    idle.hello().await;
    let msg = idle.expect_error(0, ErrorCode::Timeout).await;
    assert!(msg.message.contains("idle"));
    idle.expect_closed().await;
}
