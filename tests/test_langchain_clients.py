"""LangChain's PAI-EAS clients pointed at the server, unchanged."""

from langchain_community.chat_models import PaiEasChatEndpoint
from langchain_community.llms.pai_eas_endpoint import PaiEasEndpoint
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from tests.conftest import TOKEN


def test_pai_eas_endpoint(secured_server):
    llm = PaiEasEndpoint(eas_service_url=secured_server.url, eas_service_token=TOKEN, max_new_tokens=40)
    answer = llm.invoke("What is the capital of France?")
    assert "Paris" in answer


def test_pai_eas_endpoint_stop_sequence(secured_server):
    llm = PaiEasEndpoint(eas_service_url=secured_server.url, eas_service_token=TOKEN, max_new_tokens=60, temperature=0.0)
    full = llm.invoke("Count from 1 to 10, separated by commas.")
    assert "5" in full
    cut = llm.invoke("Count from 1 to 10, separated by commas.", stop=["5"])
    assert "5" not in cut and full.startswith(cut.rstrip())


def test_pai_eas_chat_endpoint_with_history(secured_server):
    chat = PaiEasChatEndpoint(eas_service_url=secured_server.url, eas_service_token=TOKEN, max_new_tokens=40)
    reply = chat.invoke(
        [
            SystemMessage(content="You are a geography teacher."),
            HumanMessage(content="Hello!"),
            AIMessage(content="Hello! Ask me about geography."),
            HumanMessage(content="What is the capital of France?"),
        ]
    )
    assert isinstance(reply, AIMessage)
    assert "Paris" in reply.content
